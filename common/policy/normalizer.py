"""Action and proprioceptive-state normalisation from a LeRobot dataset's ``meta.stats``.

``x_norm = (x - mean) / (std + eps)``. The statistics are registered buffers, so they travel
with ``state_dict`` (save/load, weight broadcast). Without statistics the buffers hold mean 0
and std 1, i.e. the identity up to ``eps``; ``has_stats`` records which case holds.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

# LeRobot feature names -> our short names.
LEROBOT_KEYS = {"action": "action", "state": "observation.state"}


def _as_vector(value, dim: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=torch.float32).reshape(-1)
    if t.numel() != dim:
        raise ValueError(f"{what} has {t.numel()} entries, expected {dim}")
    return t


class Normalizer(nn.Module):
    def __init__(self, action_dim: int, state_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)
        self.dims = {"action": action_dim, "state": state_dim}
        for name, dim in self.dims.items():
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
            self.register_buffer(f"{name}_min", torch.full((dim,), -float("inf")))
            self.register_buffer(f"{name}_max", torch.full((dim,), float("inf")))
        self.register_buffer("has_stats", torch.zeros(2))  # [action, state] loaded from stats

    @classmethod
    def from_lerobot_stats(cls, stats: Optional[Mapping], action_dim: int = 7, state_dim: int = 8,
                           eps: float = 1e-6) -> "Normalizer":
        norm = cls(action_dim, state_dim, eps)
        if stats:
            norm.load_lerobot_stats(stats)
        return norm

    @torch.no_grad()
    def load_lerobot_stats(self, stats: Mapping) -> None:
        """Take "mean"/"std" (and "min"/"max" when present) of "action" and "observation.state".
        Other features (images, ...) are ignored; a missing feature stays the identity."""
        for i, (name, key) in enumerate(LEROBOT_KEYS.items()):
            feat = stats.get(key)
            dim = self.dims[name]
            if feat is None or dim == 0:
                continue
            for field in ("mean", "std"):
                if field not in feat:
                    raise ValueError(f"stats[{key!r}] lacks {field!r}")
                getattr(self, f"{name}_{field}").copy_(_as_vector(feat[field], dim, f"stats[{key!r}][{field!r}]"))
            for field in ("min", "max"):
                if field in feat:
                    getattr(self, f"{name}_{field}").copy_(_as_vector(feat[field], dim, f"stats[{key!r}][{field!r}]"))
            self.has_stats[i] = 1.0

    def normalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")
        return (x - mean) / (std + self.eps)

    def unnormalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")
        return x * (std + self.eps) + mean

    def to_lerobot_stats(self) -> dict:
        """The statistics as plain lists, keyed like LeRobot's ``meta.stats`` (for stats.json)."""
        out = {}
        for i, (name, key) in enumerate(LEROBOT_KEYS.items()):
            if self.has_stats[i] > 0:
                out[key] = {f: getattr(self, f"{name}_{f}").tolist() for f in ("mean", "std", "min", "max")}
        return out
