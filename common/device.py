"""The torch device a config names: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``;
and the reduced-precision autocast a config names (``learner.autocast_dtype``, ``actor.server.autocast_dtype``)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """null -> None (float32), "bfloat16" / "float16" -> the torch dtype."""
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {list(AUTOCAST_DTYPES)}, got {name!r}")
    return AUTOCAST_DTYPES[name]


def autocast(device: torch.device, dtype: Optional[torch.dtype], cache: bool = True):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None. ``cache=False``
    while capturing a CUDA graph (PyTorch requires it: the casts must be part of the graph)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)
