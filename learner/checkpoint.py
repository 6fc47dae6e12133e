"""Learner checkpoints: policy, optimiser, counters; atomic, newest K kept.

Layout of ``<dir>/ckpt-<updates:010d>/``:
  policy/              ``policy.save`` output (weights, config, normalisation statistics): a
                       deployable policy on its own (the EMA of the weights when the learner keeps one)
  trained_policy/      only with an EMA: the raw weights the optimiser trains (what a resume continues)
  optimizer.pt         optimiser state dict
  meta.json            counters (policy version, updates, samples, drops), the policy class, extras

A checkpoint is written under a temporary name in the same directory and renamed into place, so
a reader (or a restart after a crash mid-save) only ever sees complete checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from common.imports import import_object
from learner.ema import as_ema

PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-"


@dataclass
class LearnerCounters:
    policy_version: int = 0  # version of the weights in this checkpoint; resuming continues from it
    updates: int = 0  # optimiser updates (train steps)
    sim_samples: int = 0  # chunk-steps trained on (filtered BC: every chunk-step that reached its success replay)
    real_samples: int = 0  # real frames drawn for the SFT loss
    dropped_segments: int = 0  # too stale, overflow or malformed
    ema_steps: int = 0  # optimiser steps folded into the EMA of the weights (its decay's warm-up counts them)


@dataclass
class Checkpoint:
    path: Path
    policy: torch.nn.Module
    optimizer_state: dict
    counters: LearnerCounters
    extra: dict = field(default_factory=dict)
    ema: Optional[torch.nn.Module] = None  # the EMA of ``policy`` (saved as policy/), when the learner kept one

    def restore(self, policy: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Copy the saved weights (normaliser buffers included) and optimiser state into live objects."""
        policy.load_state_dict(self.policy.state_dict())
        if optimizer is not None:
            optimizer.load_state_dict(self.optimizer_state)


def _class_path(obj) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"




def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(directory: str | os.PathLike, policy, optimizer: torch.optim.Optimizer,
                    counters: LearnerCounters, keep: int = 3, extra: Optional[dict[str, Any]] = None,
                    ema=None) -> Path:
    """Write a checkpoint atomically and delete all but the newest ``keep`` (``keep <= 0``: keep all).
    With ``ema`` the EMA is the checkpoint's deployable policy/ and ``policy`` goes to trained_policy/."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(TMP_PREFIX + "*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)

    final = d / f"{PREFIX}{counters.updates:010d}"
    tmp = d / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    if ema is not None:
        ema.save(str(tmp / "policy"))
        policy.save(str(tmp / "trained_policy"))
    else:
        policy.save(str(tmp / "policy"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    meta = {"counters": asdict(counters), "policy_class": _class_path(policy), "extra": extra or {},
            "saved_at": time.time()}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())

    if final.exists():  # saved twice at the same update (periodic, then on demand)
        old = d / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)

    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> Checkpoint:
    path = Path(path)
    with open(path / "meta.json") as f:
        meta = json.load(f)
    policy_class = import_object(meta["policy_class"])
    ema = None
    if (path / "trained_policy").is_dir():
        policy = policy_class.load(str(path / "trained_policy"), map_location=map_location)
        ema = as_ema(policy_class.load(str(path / "policy"), map_location=map_location))
    else:
        policy = policy_class.load(str(path / "policy"), map_location=map_location)
    optimizer_state = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
    known = {k: v for k, v in meta["counters"].items() if k in LearnerCounters.__dataclass_fields__}
    return Checkpoint(path, policy, optimizer_state, LearnerCounters(**known), meta.get("extra", {}), ema)


def load_latest_checkpoint(directory: str | os.PathLike, map_location: str = "cpu") -> Optional[Checkpoint]:
    """The newest complete checkpoint in ``directory``, or None when there is none."""
    found = list_checkpoints(directory)
    return load_checkpoint(found[-1], map_location) if found else None
