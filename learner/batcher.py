"""Received trajectory segments -> time-major [T, B] training batches on the learner's device.

A segment is the dict of numpy arrays of ``common.segment.SegmentSpec`` plus the version of the
policy that produced it. Policy lag = learner version - behaviour version. A segment whose lag
exceeds ``max_policy_lag`` is dropped (on arrival, and again when a batch is assembled, since
segments age in the queue) and counted. Segments from a version newer than the learner's
(negative lag, e.g. after the learner resumed from an older checkpoint) are kept: their
behaviour log-probabilities are still those of the policy that acted.

The batcher keeps the arrays it is given: copy out of a shared-memory slot before freeing it.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

# Per-step arrays the loss needs as float (flags come as uint8 on the wire); tokens as int64.
FLOAT_KEYS = ("done", "success")
LONG_KEYS = ("tokens",)


class Batcher:
    def __init__(self, num_segments_per_batch: int, max_policy_lag: int, max_queued_segments: int,
                 device: str | torch.device = "cpu"):
        if not 1 <= num_segments_per_batch <= max_queued_segments:
            raise ValueError(f"need 1 <= num_segments_per_batch ({num_segments_per_batch}) <= "
                             f"max_queued_segments ({max_queued_segments})")
        self.num_segments_per_batch = num_segments_per_batch
        self.max_policy_lag = max_policy_lag
        self.max_queued_segments = max_queued_segments
        self.device = torch.device(device)
        self._queue: deque[tuple[dict[str, np.ndarray], int]] = deque()
        self.accepted_segments = 0
        self.dropped_stale = 0
        self.dropped_overflow = 0
        self.batches = 0
        self.last_batch_lags = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_config(cls, cfg, device: str | torch.device = "cpu") -> "Batcher":
        """From the ``learner`` config: a batch is ``global_batch_size`` segments."""
        return cls(cfg.global_batch_size, cfg.max_policy_lag, cfg.max_queued_segments, device)

    # ---- intake -----------------------------------------------------------------------------
    def add(self, segment: dict[str, np.ndarray], policy_version: int, current_version: int) -> bool:
        """Queue a segment (its layout already checked at ingest); False (and counted) when it is
        too stale."""
        if current_version - policy_version > self.max_policy_lag:
            self.dropped_stale += 1
            return False
        if len(self._queue) >= self.max_queued_segments:
            self._queue.popleft()  # the oldest is the stalest
            self.dropped_overflow += 1
        self._queue.append((segment, int(policy_version)))
        self.accepted_segments += 1
        return True

    def _drop_stale(self, current_version: int) -> None:
        fresh = [(s, v) for s, v in self._queue if current_version - v <= self.max_policy_lag]
        self.dropped_stale += len(self._queue) - len(fresh)
        self._queue = deque(fresh)

    # ---- output -----------------------------------------------------------------------------
    def ready(self, current_version: int) -> bool:
        self._drop_stale(current_version)
        return len(self._queue) >= self.num_segments_per_batch

    def next_batch(self, current_version: int) -> Optional[dict[str, torch.Tensor]]:
        """The oldest ``num_segments_per_batch`` fresh segments stacked along dim 1 ([T(+1), B, ...]),
        with ``policy_lag`` [B]; None when not enough are queued."""
        if not self.ready(current_version):
            return None
        taken = [self._queue.popleft() for _ in range(self.num_segments_per_batch)]
        lags = np.array([current_version - v for _, v in taken], dtype=np.int64)
        batch = {k: self._to_device(np.stack([s[k] for s, _ in taken], axis=1), k) for k in taken[0][0]}
        batch["policy_lag"] = torch.as_tensor(lags, device=self.device)
        self.last_batch_lags = lags
        self.batches += 1
        return batch

    def _to_device(self, array: np.ndarray, key: str) -> torch.Tensor:
        t = torch.from_numpy(array)
        if key in FLOAT_KEYS:
            t = t.float()
        elif key in LONG_KEYS:
            t = t.long()
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    # ---- status -----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, float]:
        lags = self.last_batch_lags
        return {
            "batcher/queue_depth": float(self.queue_depth),
            "batcher/accepted_segments": float(self.accepted_segments),
            "batcher/dropped_stale_segments": float(self.dropped_stale),
            "batcher/dropped_overflow_segments": float(self.dropped_overflow),
            "policy_lag/mean": float(lags.mean()) if lags.size else 0.0,
            "policy_lag/max": float(lags.max()) if lags.size else 0.0,
        }

    def lag_histogram(self) -> np.ndarray:
        """Counts of the last batch's lags: ``hist[l]`` segments had lag ``l`` (negative lags count as 0)."""
        return np.bincount(np.clip(self.last_batch_lags, 0, None), minlength=self.max_policy_lag + 1)
