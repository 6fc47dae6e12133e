"""TensorBoard logging and the loss-ratio alarm.

``LossRatioMonitor`` warns (python logging) when ``train/loss_ratio`` = beta*|L_SFT|/|L_RL| has
stayed above ``threshold`` for ``patience`` consecutive updates, and again every further
``patience`` updates while it stays there: the SFT term then drowns the RL signal and
``sft_loss_weight`` should come down.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


class MetricsWriter:
    """A thin SummaryWriter wrapper: scalars by name, non-finite values skipped (and counted)."""

    def __init__(self, log_dir: str | os.PathLike, flush_secs: int = 10):
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=flush_secs)
        self.skipped_non_finite = 0

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            value = float(value)
            if not math.isfinite(value):
                self.skipped_non_finite += 1
                continue
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class LossRatioMonitor:
    def __init__(self, threshold: float = 1e5, patience: int = 10, logger: Optional[logging.Logger] = None):
        if patience < 1:
            raise ValueError("patience must be >= 1")
        self.threshold = threshold
        self.patience = patience
        self.logger = logger or log
        self.streak = 0  # consecutive updates above the threshold

    @classmethod
    def from_config(cls, cfg) -> "LossRatioMonitor":
        return cls(cfg.loss_ratio_warn_threshold, cfg.loss_ratio_warn_patience)

    def update(self, loss_ratio: float) -> bool:
        """Record one update's ratio; True when this call logged a warning."""
        self.streak = self.streak + 1 if loss_ratio > self.threshold else 0
        if self.streak and self.streak % self.patience == 0:
            self.logger.warning(
                "train/loss_ratio = %.3g has stayed above %.3g for %d consecutive updates: the SFT term "
                "dominates the RL loss; consider lowering sft_loss_weight", loss_ratio, self.threshold, self.streak)
            return True
        return False
