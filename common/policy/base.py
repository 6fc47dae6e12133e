"""The one policy interface that the learner, the actors and the real-robot deployer all use.

Observation batch (``Obs``), as torch tensors on the policy's device:
  image  uint8  [B, H, W, 3]   third-person RGB (any size; the policy resizes)
  tokens int64  [B, L]         instruction token ids from ``policy.tokenize`` (0 = padding)
  state  float32 [B, S]        proprioception in env units (optional: ``None`` when unused)

Actions are 7-D (dx, dy, dz, droll, dpitch, dyaw, gripper) in env units, in chunks of
``chunk_size`` (H) of which the actor executes the first ``exec_horizon`` (k).

For RL the flow-matching head denoises stochastically; ``sample`` returns the whole denoising
chain ([B, K+1, H, 7] in normalised action space), so ``evaluate`` can compute the exact
log-probability of that chain under the current weights.
"""
from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import flow

Obs = dict  # {"image": uint8 [B,H,W,3], "tokens": int64 [B,L], "state": float32 [B,S] | None}


@dataclass
class SampleOutput:
    actions: torch.Tensor  # [B, H, 7] env units (un-normalised final chain element)
    chain: torch.Tensor  # [B, K+1, H, 7] normalised denoising chain, chain[:, 0] the initial noise
    log_prob: torch.Tensor  # [B] log-probability of the chain's stochastic transitions
    value: torch.Tensor  # [B]


@dataclass
class EvaluateOutput:
    log_prob: torch.Tensor  # [B]
    value: torch.Tensor  # [B]
    entropy: torch.Tensor  # [B]


class Policy(nn.Module, abc.ABC):
    """Every backend (compact VLA, pi0.5) implements these."""

    chunk_size: int  # H
    exec_horizon: int  # k <= H
    num_denoise_steps: int  # K
    action_dim: int = 7

    def _init_flow_fields(self, cfg: dict) -> None:
        """Chunking, denoising-noise and flow-time fields every flow-matching backend reads from
        its config, validated once here."""
        self.chunk_size, self.exec_horizon = cfg["chunk_size"], cfg["exec_horizon"]
        self.num_denoise_steps, self.action_dim = cfg["num_denoise_steps"], cfg["action_dim"]
        self.token_len, self.state_dim, self.image_size = cfg["token_len"], cfg["state_dim"], cfg["image_size"]
        if not 1 <= self.exec_horizon <= self.chunk_size:
            raise ValueError(f"exec_horizon {self.exec_horizon} must lie in [1, chunk_size={self.chunk_size}]")
        noise = cfg["noise"]
        self.noise_mode, self.sigma_min, self.sigma_max = noise["mode"], noise["sigma_min"], noise["sigma_max"]
        if self.noise_mode not in ("learned", "scheduled") or not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(f"bad noise config {noise} (mode learned|scheduled, 0 < sigma_min <= sigma_max)")
        self.action_clip = cfg.get("action_clip")
        self.time_cfg = cfg["time_sampling"]
        # .get: checkpoints saved before these keys existed score every term of every step
        terms = flow.scored_terms(self.num_denoise_steps, self.chunk_size, self.exec_horizon,
                                  noise.get("stochastic_steps", "all"), noise.get("score", "chunk"))
        self.stochastic_steps = tuple(terms.any(1).tolist())  # Python: sampling never reads the device
        self.register_buffer("chain_terms", terms, persistent=False)  # derived from the config, not weights

    @abc.abstractmethod
    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        """Instruction strings -> int64 [B, L] token ids (0 = padding)."""

    @abc.abstractmethod
    def sample(self, obs: Obs, generator: Optional[torch.Generator] = None) -> SampleOutput:
        """Stochastic action chunk with its chain, log-probability and value (for RL rollouts)."""

    @abc.abstractmethod
    def evaluate(self, obs: Obs, chain: torch.Tensor) -> EvaluateOutput:
        """Log-probability, value and entropy of stored chains under the current weights."""

    @abc.abstractmethod
    def value(self, obs: Obs) -> torch.Tensor:
        """State value [B] (used for V-trace bootstrap)."""

    @abc.abstractmethod
    def sft_loss(self, obs: Obs, actions: torch.Tensor, action_pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flow-matching loss on demonstrated chunks ``actions`` [B, H, 7] in env units.
        ``action_pad`` [B, H] bool marks padded steps past an episode's end (excluded)."""

    @abc.abstractmethod
    def act(self, obs: Obs, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Deterministic action chunk [B, H, 7] in env units (ODE denoising from x_0 = 0), for eval and
        deployment; with ``generator`` the ODE starts from x_0 ~ N(0, I) (a sample of the flow's distribution)."""

    @abc.abstractmethod
    def save(self, path: str) -> None:
        """Write weights, config and normalisation statistics to directory ``path``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str, map_location: str = "cpu") -> "Policy":
        """Inverse of ``save``."""

    # ----- shared helpers (concrete; every backend inherits them) ------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_env_actions(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised actions (a chain's last element) [..., 7] -> env units, bounded by ``action_clip``:
        what the env receives for a sampled chain (needs the backend's ``normalizer``)."""
        if self.action_clip is not None:
            x = x.clamp(-self.action_clip, self.action_clip)
        return self.normalizer.unnormalize("action", x)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def get_weights(self) -> dict[str, np.ndarray]:
        """A CPU numpy copy of the state dict (floating tensors as float32), for broadcasting."""
        out = {}
        for name, t in self.state_dict().items():
            t = t.detach().to("cpu")
            out[name] = (t.float() if t.is_floating_point() else t).numpy().copy()
        return out

    @torch.no_grad()
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Copy a ``get_weights`` dict in place. Strict: any missing or unexpected key, or a shape
        mismatch, raises ``ValueError`` naming them, and then nothing is changed."""
        state = self.state_dict()
        missing = sorted(set(state) - set(weights))
        unexpected = sorted(set(weights) - set(state))
        bad_shape = [f"{k}: got {tuple(np.shape(weights[k]))}, expected {tuple(state[k].shape)}"
                     for k in state if k in weights and tuple(np.shape(weights[k])) != tuple(state[k].shape)]
        if missing or unexpected or bad_shape:
            raise ValueError(f"set_weights: missing keys {missing}; unexpected keys {unexpected}; "
                             f"shape mismatches {bad_shape}")
        with warnings.catch_warnings():  # read-only arrays (e.g. received ZeroMQ frames) are only read
            warnings.simplefilter("ignore", UserWarning)
            for k, t in state.items():
                t.copy_(torch.as_tensor(np.asarray(weights[k])))
