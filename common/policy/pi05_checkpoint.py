"""Weights in the key layout of lerobot's pi0.5 ``model.safetensors``.

A LeRobot pi0.5 file holds ``model.paligemma_with_expert.*``, ``model.action_in_proj.*``,
``model.action_out_proj.*``, ``model.time_mlp_in.*``, ``model.time_mlp_out.*`` (openpi's own PyTorch
export has the same keys without ``model.``). Facts of that format handled here:
  - PaliGemma's token embedding is tied to its LM head and stored once, as ``...paligemma.lm_head.weight``
    (safetensors keeps the alphabetically first name of shared tensors); ``...embed_tokens.weight``
    is accepted instead.
  - ``...gemma_expert.lm_head.weight`` (a 257152 x 1024 head the expert never uses) is skipped.
Our files add ``model.value_head.*``, ``model.noise_head.*`` (RL heads) and ``normalizer.*``; when
loading a LeRobot file these may be absent (``allow_missing``) and keep their fresh values.
Anything else missing, unexpected or of the wrong shape raises ``ValueError`` listing every key.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

PREFIX = "model."
EMBED_KEY = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "model.paligemma_with_expert.paligemma.lm_head.weight"
SKIPPED_KEYS = frozenset({"model.paligemma_with_expert.gemma_expert.lm_head.weight"})
OUR_PREFIXES = ("model.value_head.", "model.noise_head.", "normalizer.")


def to_file_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict as written to model.safetensors: the tied embedding once, under LeRobot's name."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    if EMBED_KEY in state and LM_HEAD_KEY in state:
        del state[EMBED_KEY]
    return state


def _normalise_keys(file_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in file_state.items():
        if not key.startswith(PREFIX) and not key.startswith("normalizer."):
            key = PREFIX + key  # openpi layout
        if key in SKIPPED_KEYS:
            continue
        out[key] = value
    if EMBED_KEY in out and LM_HEAD_KEY not in out:
        out[LM_HEAD_KEY] = out.pop(EMBED_KEY)
    out.pop(EMBED_KEY, None)  # tied: the LM head's copy is the one loaded
    return out


def check_and_load(module: nn.Module, file_state: dict[str, torch.Tensor], allow_missing: Iterable[str] = (),
                   source: str = "checkpoint") -> None:
    """Strict load (up to ``allow_missing`` key prefixes) with every problem listed in one error;
    nothing is changed when it raises. Values are cast to each parameter's dtype."""
    file_state = _normalise_keys(file_state)
    own = module.state_dict()
    own.pop(EMBED_KEY, None)
    allow = tuple(allow_missing)
    missing = sorted(k for k in own if k not in file_state and not k.startswith(allow))
    unexpected = sorted(k for k in file_state if k not in own)
    bad_shape = sorted(f"{k}: {tuple(file_state[k].shape)} in {source}, expected {tuple(own[k].shape)}"
                       for k in own if k in file_state and tuple(file_state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad_shape:
        raise ValueError(f"cannot load pi0.5 weights from {source}:\n  missing keys ({len(missing)}): {missing}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
                         f"  shape mismatches ({len(bad_shape)}): {bad_shape}")
    with torch.no_grad():
        for k, t in own.items():
            if k in file_state:
                t.copy_(file_state[k].to(t.dtype))
