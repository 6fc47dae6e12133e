"""pi0.5 behind the policy interface: PaliGemma prefix + adaRMS Gemma action expert (``pi05_model``),
the pi0.5 prompt (``pi05_prompt``), LeRobot checkpoint layout (``pi05_checkpoint``), and the same
stochastic-denoising RL machinery as the compact backend (``flow``).

Flow time: chains, log-probabilities and SFT times use ``flow.py``'s convention (t = 0 noise, t = 1
data, v = action - noise). pi0/pi0.5 weights use t_pi0 = 1 - t and predict u = noise - action, so
the network is called at t_pi0 = 1 - t and its output negated: v(x, t) = -u_pi0(x, 1 - t). pi0.5's
SFT time t_pi0 = 0.001 + 0.999 * Beta(1.5, 1) is then t = 0.999 * Beta(1, 1.5) (``time_sampling``).

Per call: the image is resized with padding (pi0's resize_with_pad) to ``image_size``; the prompt
is the instruction tokens from ``tokenize`` plus, with ``use_state``, the normalised state as 256-bin
numbers. ``sample``/``evaluate``/``act``/``value`` run the VLM over the prefix once and reuse its
keys/values for every denoising step (``kv_cache: false`` instead runs the joint block-causal pass,
prefix layers included, at every step: slower, for checking); ``sft_loss`` runs the joint pass once,
as lerobot trains. ``train_expert_only`` freezes the PaliGemma prefix (vision + language model) as
RLinf does by default: its pass then runs without autograd, and the expert, projections, value and
noise heads train. Actions are ``action_dim`` wide in our chains, zero-padded to ``max_action_dim``
for the network.

Normalisation is the shared ``Normalizer`` ((x - mean) / std). lerobot's pi0.5 maps q01..q99 to
-1..1 instead; ``normalization: quantiles`` reproduces that with mean = (q01 + q99) / 2 and
std = (q99 - q01) / 2 from the stats' q01/q99 (``quantile_stats``), for checkpoints fine-tuned by lerobot.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from . import flow
from .base import EvaluateOutput, Obs, Policy, SampleOutput
from .factory import merged, plain_dict
from .normalizer import Normalizer
from .pi05_checkpoint import EMBED_KEY, LM_HEAD_KEY, OUR_PREFIXES, check_and_load, to_file_state
from .pi05_model import Pi05Model, PrefixCache
from .pi05_prompt import Pi05Prompt

CONFIG_FILE, WEIGHTS_FILE, STATS_FILE, TOKENIZER_DIR = "config.json", "model.safetensors", "stats.json", "tokenizer"


def resize_with_pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,size,size] in [-1,1], aspect kept, black (-1) padding (as pi0)."""
    x = image.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        ratio = max(w / size, h / size)
        nh, nw = int(h / ratio), int(w / ratio)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False).clamp(0, 255)
        top, left = (size - nh) // 2, (size - nw) // 2
        x = F.pad(x, (left, size - nw - left, top, size - nh - top), value=0.0)
    return x / 127.5 - 1.0


def quantile_stats(stats: Mapping) -> dict:
    """LeRobot stats -> the same stats with mean/std replaced so that (x - mean) / std maps q01 to -1
    and q99 to 1 (lerobot's QUANTILES normalisation) for every feature that has q01 and q99."""
    out = dict(stats)
    for key, feat in stats.items():
        if isinstance(feat, Mapping) and "q01" in feat and "q99" in feat:
            q01, q99 = (torch.as_tensor(feat[q], dtype=torch.float64) for q in ("q01", "q99"))
            out[key] = {**feat, "mean": ((q01 + q99) / 2).tolist(), "std": ((q99 - q01) / 2).tolist()}
    return out


class Pi05Policy(Policy):
    def __init__(self, cfg: Mapping, stats: Optional[Mapping] = None):
        super().__init__()
        self.cfg = json.loads(json.dumps(plain_dict(cfg)))
        cfg = self.cfg
        self._init_flow_fields(cfg)
        if self.action_dim > cfg["max_action_dim"]:
            raise ValueError(f"action_dim {self.action_dim} > max_action_dim {cfg['max_action_dim']}")
        if not cfg.get("tokenizer"):
            raise ValueError("pi05 needs `tokenizer`: a local PaliGemma tokenizer folder")

        self.prompt = Pi05Prompt(cfg["tokenizer"], self.token_len, cfg["use_state"], cfg["max_state_dim"],
                                 cfg["state_bins"])
        if self.prompt.vocab_size > cfg["vlm"]["vocab_size"]:
            raise ValueError(f"tokenizer has {self.prompt.vocab_size} tokens > "
                             f"vlm.vocab_size {cfg['vlm']['vocab_size']}")
        if cfg["normalization"] not in ("mean_std", "quantiles"):
            raise ValueError(f"unknown normalization {cfg['normalization']!r} (mean_std | quantiles)")
        if stats and cfg["normalization"] == "quantiles":
            stats = quantile_stats(stats)
        self.normalizer = Normalizer.from_lerobot_stats(stats, self.action_dim, self.state_dim, cfg["norm_eps"])
        self.model = Pi05Model(cfg, learned_noise=self.noise_mode == "learned")
        if self.noise_mode == "learned":
            torch.nn.init.zeros_(self.model.noise_head.weight)
            torch.nn.init.constant_(self.model.noise_head.bias,
                                    flow.inverse_bounded_sigma(cfg["noise"]["sigma_init"], self.sigma_min, self.sigma_max))
        self.register_buffer("sigma_schedule", flow.scheduled_sigma(self.num_denoise_steps, self.sigma_min,
                                                                    self.sigma_max), persistent=False)
        if cfg.get("checkpoint"):
            self.load_lerobot_weights(cfg["checkpoint"])
        self.model.set_precision(cfg["dtype"])
        if cfg["gradient_checkpointing"]:
            self.model.enable_gradient_checkpointing()
        self.freeze_vlm = bool(cfg["train_expert_only"])
        if self.freeze_vlm:
            self.model.paligemma_with_expert.paligemma.requires_grad_(False)

    # ----- observation -> prefix ----------------------------------------------------------------
    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        return self.prompt.tokenize(instructions).to(self.device)

    def prefix_inputs(self, obs: Obs):
        tokens = obs["tokens"].long()
        if tokens.shape[1] > self.token_len:
            raise ValueError(f"tokens have length {tokens.shape[1]} > token_len {self.token_len}")
        state = obs.get("state")
        if self.prompt.use_state:
            if state is None:
                raise ValueError("this pi05 config puts the state in the prompt (use_state: true); "
                                 "obs['state'] is None")
            tokens = self.prompt.full_tokens(tokens, self.normalizer.normalize("state", state.float()))
        return self.model.embed_prefix(resize_with_pad(obs["image"], self.image_size), tokens)

    def _frozen_prefix(self):
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vlm)

    def prefix_cache(self, obs: Obs) -> PrefixCache:
        with self._frozen_prefix():
            return self.model.prefix_pass(*self.prefix_inputs(obs))

    def value(self, obs: Obs) -> torch.Tensor:
        cache = self.prefix_cache(obs)
        return self.model.value(cache.hidden, cache.pad)

    # ----- one denoising transition: x_{k+1} ~ N(x_k + dt * v(x_k, t_k), sigma_k^2) ---------------
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cache: PrefixCache):
        """Our-convention velocity [N,H,A] and raw noise level, against a prefix cache."""
        u, raw = self.model.action_out(self.model.expert_pass(cache, x, 1.0 - t), self.action_dim)
        return -u, raw

    def velocity_joint(self, x: torch.Tensor, t: torch.Tensor, embs: torch.Tensor, pad: torch.Tensor):
        # A frozen prefix needs no guard here: none of its inputs or weights requires grad.
        _, out = self.model.joint_pass(embs, pad, x, 1.0 - t)
        u, raw = self.model.action_out(out, self.action_dim)
        return -u, raw

    def _mean_sigma(self, x, velocity, raw, step):
        mean = x + velocity / self.num_denoise_steps
        if raw is not None:
            return mean, flow.bounded_sigma(raw, self.sigma_min, self.sigma_max)
        return mean, self.sigma_schedule[step][:, None, None].expand_as(mean)

    def transition(self, x: torch.Tensor, step: torch.Tensor, cache: PrefixCache):
        """x [N,H,A], step [N] (long, 0..K-1) -> (mean, sigma), both [N,H,A]."""
        velocity, raw = self.velocity(x, step.float() / self.num_denoise_steps, cache)
        return self._mean_sigma(x, velocity, raw, step)

    def chain_transitions(self, cache: PrefixCache, chain: torch.Tensor):
        """All K transitions of stored chains in one batched expert pass -> mean, sigma [B,K,H,A]."""
        B, K1, H, A = chain.shape
        K = self.num_denoise_steps
        if K1 != K + 1 or H != self.chunk_size or A != self.action_dim:
            raise ValueError(f"chain shape {tuple(chain.shape)} != [B, {K + 1}, {self.chunk_size}, {self.action_dim}]")
        steps = torch.arange(K, device=chain.device).repeat(B)
        mean, sigma = self.transition(chain[:, :-1].reshape(B * K, H, A), steps, cache.repeat_interleave(K))
        return mean.view(B, K, H, A), sigma.view(B, K, H, A)

    # ----- RL ----------------------------------------------------------------------------------
    def sample(self, obs: Obs, generator: Optional[torch.Generator] = None) -> SampleOutput:
        cache = self.prefix_cache(obs)
        if not self.cfg["kv_cache"]:  # every step below recomputes the prefix in a joint pass
            embs, pad = self.prefix_inputs(obs)
        B = cache.pad.shape[0]
        def transition(x, step):
            if self.cfg["kv_cache"]:
                return self.transition(x, step, cache)
            t = step.float() / self.num_denoise_steps
            return self._mean_sigma(x, *self.velocity_joint(x, t, embs, pad), step)

        chain, log_prob = flow.sample_chain(self._noise(B, generator), self.num_denoise_steps, transition,
                                            lambda: self._noise(B, generator), self.chain_terms, self.stochastic_steps)
        return SampleOutput(actions=self.to_env_actions(chain[:, -1]), chain=chain, log_prob=log_prob,
                            value=self.model.value(cache.hidden, cache.pad))

    def evaluate(self, obs: Obs, chain: torch.Tensor) -> EvaluateOutput:
        cache = self.prefix_cache(obs)
        chain = chain.float()
        mean, sigma = self.chain_transitions(cache, chain)
        log_prob = flow.chain_log_prob(chain, mean, sigma, self.chain_terms)
        entropy = flow.chain_entropy(sigma, self.chain_terms)
        return EvaluateOutput(log_prob=log_prob, value=self.model.value(cache.hidden, cache.pad), entropy=entropy)

    # ----- supervised flow matching -------------------------------------------------------------
    def sft_loss(self, obs: Obs, actions: torch.Tensor, action_pad: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean flow-matching error over the chunk steps that ``action_pad`` does not mark."""
        return flow.masked_mean(self.sft_errors(obs, actions, generator), action_pad)

    def sft_errors(self, obs: Obs, actions: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-step flow-matching error [B, H] (one joint block-causal pass, as lerobot trains)."""
        target = self.normalizer.normalize("action", actions.float())
        B = target.shape[0]
        noise = self._noise(B, generator)
        tc = self.time_cfg
        t = flow.sample_time(B, tc["dist"], tc["alpha"], tc["beta"], tc["t_max"], generator, target.device)
        x_t = flow.interpolate(noise, target, t[:, None, None])
        velocity, _ = self.velocity_joint(x_t, t, *self.prefix_inputs(obs))
        return (velocity - flow.velocity_target(noise, target)).pow(2).mean(-1)

    # ----- deterministic ODE -------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: Obs, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Euler ODE over the same K steps without noise, from x_0 = 0 (or x_0 ~ N(0, I) with a generator)."""
        cache = self.prefix_cache(obs)
        B = cache.pad.shape[0]
        x = (self._noise(B, generator) if generator is not None
             else torch.zeros(B, self.chunk_size, self.action_dim, device=cache.pad.device))
        for k in range(self.num_denoise_steps):
            velocity, _ = self.velocity(x, torch.full((B,), k / self.num_denoise_steps, device=x.device), cache)
            x = x + velocity / self.num_denoise_steps
        return self.to_env_actions(x)

    # ----- helpers -----------------------------------------------------------------------------
    def _noise(self, B: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(B, self.chunk_size, self.action_dim, generator=generator, device=self.device)


    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "freeze_vlm", False):
            self.model.paligemma_with_expert.paligemma.eval()
        return self

    # ----- weights broadcast: the tied token embedding travels once, as the LM head ----------------
    def get_weights(self) -> dict:
        weights = super().get_weights()
        weights.pop(EMBED_KEY, None)
        return weights

    def set_weights(self, weights: dict) -> None:
        if EMBED_KEY not in weights and LM_HEAD_KEY in weights:
            weights = {**weights, EMBED_KEY: weights[LM_HEAD_KEY]}
        super().set_weights(weights)

    # ----- persistence -------------------------------------------------------------------------
    def lerobot_config(self) -> dict:
        """The PI05Config fields LeRobot reads, written next to ours in config.json."""
        c = self.cfg
        return {"type": "pi05", "chunk_size": c["chunk_size"], "n_action_steps": c["exec_horizon"],
                "max_state_dim": c["max_state_dim"], "max_action_dim": c["max_action_dim"],
                "num_inference_steps": c["num_denoise_steps"], "image_resolution": [c["image_size"]] * 2,
                "dtype": c["dtype"], "tokenizer_max_length": self.prompt.length,
                "train_expert_only": c["train_expert_only"], "gradient_checkpointing": c["gradient_checkpointing"],
                "min_period": c["time_embedding"]["min_period"], "max_period": c["time_embedding"]["max_period"]}

    def load_lerobot_weights(self, path: str) -> None:
        """Weights from a LeRobot pi0.5 folder (model.safetensors + config.json); our RL heads and the
        normaliser may be absent there and then keep their initial values."""
        from safetensors.torch import load_file

        cfg_file = os.path.join(path, CONFIG_FILE)
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                theirs = json.load(f)
            if theirs.get("type", "pi05") != "pi05":
                raise ValueError(f"{cfg_file} is a {theirs.get('type')!r} checkpoint, not pi05")
            for key, ours in (("chunk_size", self.chunk_size), ("num_inference_steps", self.num_denoise_steps)):
                if key in theirs and theirs[key] != ours:
                    warnings.warn(f"checkpoint {key}={theirs[key]}, this policy uses {ours}")
        check_and_load(self, load_file(os.path.join(path, WEIGHTS_FILE)), allow_missing=OUR_PREFIXES,
                       source=os.path.join(path, WEIGHTS_FILE))

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({**self.lerobot_config(), "name": "pi05", "tandem": self.cfg}, f, indent=2)
        with open(os.path.join(path, STATS_FILE), "w") as f:
            json.dump(self.normalizer.to_lerobot_stats(), f, indent=2)
        self.prompt.tok.save_pretrained(os.path.join(path, TOKENIZER_DIR))
        save_file(to_file_state(self), os.path.join(path, WEIGHTS_FILE))

    @classmethod
    def load(cls, path: str, map_location: str = "cpu", overrides: Optional[Mapping] = None) -> "Pi05Policy":
        from safetensors.torch import load_file

        with open(os.path.join(path, CONFIG_FILE)) as f:
            cfg = merged(json.load(f)["tandem"], overrides)
        cfg = dict(cfg, checkpoint=None, tokenizer=os.path.join(path, TOKENIZER_DIR))
        policy = cls(cfg)
        check_and_load(policy, load_file(os.path.join(path, WEIGHTS_FILE)), source=os.path.join(path, WEIGHTS_FILE))
        return policy.to(map_location)
