"""Compact VLA: a small ViT + byte-token transformer + flow-matching action expert + value head,
trained from scratch. Sizes come from ``configs/policy/{tiny,base}.yaml``.

  image uint8 [B,H,W,3] -> resize to image_size -> patch tokens -> ViT blocks  \
  instruction tokens [B,L] -> byte embeddings + positions                      > fusion blocks -> readout -> obs_emb [B,D]
  state [B,8] (normalised) -> one token (a learned "no state" token if absent) /
  obs_emb -> value head -> value [B]
  (x_k [B,H,7], t_k, obs_emb) -> action expert (adaLN transformer over H action tokens)
                               -> velocity [B,H,7] and (noise mode "learned") sigma [B,H,7]

Flow convention (t = 0 noise, t = 1 data, v = action - noise) and the chain log-probability:
see ``flow.py``. ``sample`` runs the K stochastic steps one by one (``transition``); ``evaluate``
re-scores all K steps of stored chains in one batched expert pass (``chain_transitions``);
``act`` runs the same K Euler steps without noise from x_0 = 0. Chains live in normalised action
space; ``sft_loss`` normalises env-unit actions and ``sample``/``act`` un-normalise. The stored
chain is never clipped: ``action_clip`` only bounds the normalised action handed to the env.
A ``generator`` must live on the policy's device. With ``use_state`` and ``obs["state"] is None``
the learned "no state" token stands in.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from . import flow
from .base import EvaluateOutput, Obs, Policy, SampleOutput
from .factory import merged, plain_dict
from .layers import AdaLNBlock, Block, sinusoidal_embedding
from .normalizer import Normalizer
from .tokenizer import make_tokenizer
from .vision import KeypointCNN, augment, to_model_input

CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "config.json", "model.safetensors", "stats.json"
PRIVILEGED_STATS_KEY = "observation.environment_state"  # LeRobot's key for simulator-only labels


class ObsEncoder(nn.Module):
    def __init__(self, cfg: Mapping, vocab_size: int):
        super().__init__()
        D, size, patch = cfg["width"], cfg["image_size"], cfg["vision"]["patch_size"]
        if size % patch:
            raise ValueError(f"image_size {size} is not a multiple of patch_size {patch}")
        self.image_size = size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=patch, stride=patch)
        self.image_pos = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, D))
        self.vision_blocks = nn.ModuleList(
            Block(D, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["vision"]["depth"]))
        self.text_embed = nn.Embedding(vocab_size, D)
        self.text_pos = nn.Parameter(0.02 * torch.randn(1, cfg["token_len"], D))
        self.state_proj = nn.Linear(cfg["state_dim"], D) if cfg["use_state"] else None
        self.no_state = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.readout = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.fusion_blocks = nn.ModuleList(
            Block(D, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["fusion"]["depth"]))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, state: Optional[torch.Tensor]) -> torch.Tensor:
        """x: model-input images [B,3,S,S] (``vision.to_model_input``)."""
        B = x.shape[0]
        img = self.patch_embed(x).flatten(2).transpose(1, 2) + self.image_pos
        for block in self.vision_blocks:
            img = block(img)
        tokens = tokens.long()
        txt = self.text_embed(tokens) + self.text_pos[:, : tokens.shape[1]]
        st = self.no_state.expand(B, -1, -1) if state is None else self.state_proj(state)[:, None]
        x = torch.cat([self.readout.expand(B, -1, -1), img, txt, st], dim=1)
        key_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        key_mask[:, 1 + img.shape[1]: 1 + img.shape[1] + tokens.shape[1]] = tokens != 0
        for block in self.fusion_blocks:
            x = block(x, key_mask)
        return self.norm(x[:, 0])


class KeypointObsEncoder(nn.Module):
    """CNN keypoints (x, y per heat map), a bag-of-tokens instruction embedding and the state,
    concatenated and mixed by an MLP into obs_emb [B, D] (Diffusion Policy's global conditioning)."""

    def __init__(self, cfg: Mapping, vocab_size: int):
        super().__init__()
        D, v = cfg["width"], cfg["vision"]
        self.cnn = KeypointCNN(v["channels"], v["strides"], v["keypoints"], v["groups"])
        self.text_embed = nn.EmbeddingBag(vocab_size, v["text_dim"], mode="mean", padding_idx=0)
        self.state_dim = cfg["state_dim"] if cfg["use_state"] else 0
        layers, d_in = [], self.cnn.out_dim + v["text_dim"] + self.state_dim
        for _ in range(cfg["fusion"]["depth"]):
            layers += [nn.Linear(d_in, D), nn.LayerNorm(D), nn.SiLU()]
            d_in = D
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, state: Optional[torch.Tensor]) -> torch.Tensor:
        parts = [self.cnn(x), self.text_embed(tokens.long())]
        if self.state_dim:
            parts.append(torch.zeros(x.shape[0], self.state_dim, device=x.device) if state is None else state)
        return self.mlp(torch.cat(parts, -1))


ENCODERS = {"vit": ObsEncoder, "cnn_keypoints": KeypointObsEncoder}


class ActionExpert(nn.Module):
    """Velocity field v(x_t, t, obs) over the H action tokens, plus the raw noise-level head."""

    def __init__(self, cfg: Mapping, learned_noise: bool):
        super().__init__()
        E, H, A = cfg["expert"]["width"], cfg["chunk_size"], cfg["action_dim"]
        self.width = E
        self.action_in = nn.Linear(A, E)
        self.action_pos = nn.Parameter(0.02 * torch.randn(1, H, E))
        self.time_mlp = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, E))
        self.obs_proj = nn.Linear(cfg["width"], E)
        self.blocks = nn.ModuleList(
            AdaLNBlock(E, cfg["expert"]["heads"], cfg["expert"]["mlp_ratio"]) for _ in range(cfg["expert"]["depth"]))
        self.norm_out = nn.LayerNorm(E)
        self.velocity_out = nn.Linear(E, A)
        self.noise_out = nn.Linear(E, A) if learned_noise else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs_emb: torch.Tensor):
        """x [N,H,A], t [N], obs_emb [N,D] -> velocity [N,H,A], raw noise level [N,H,A] or None."""
        cond = self.obs_proj(obs_emb) + self.time_mlp(sinusoidal_embedding(t, self.width))
        h = self.action_in(x) + self.action_pos
        for block in self.blocks:
            h = block(h, cond)
        h = self.norm_out(h)
        # float32 out, so the Gaussian math stays float32 under autocast
        return self.velocity_out(h).float(), (None if self.noise_out is None else self.noise_out(h).float())


class CompactVLA(Policy):
    def __init__(self, cfg: Mapping, stats: Optional[Mapping] = None):
        super().__init__()
        self.cfg = json.loads(json.dumps(plain_dict(cfg)))  # plain, JSON-serialisable copy
        cfg = self.cfg
        self._init_flow_fields(cfg)

        self.tokenizer = make_tokenizer(cfg["vocab"], self.token_len)
        self.normalizer = Normalizer.from_lerobot_stats(stats, self.action_dim, self.state_dim, cfg["norm_eps"])
        vision_type = cfg["vision"].get("type", "vit")
        if vision_type not in ENCODERS:
            raise ValueError(f"policy.vision.type must be one of {sorted(ENCODERS)}, got {vision_type!r}")
        self.encoder = ENCODERS[vision_type](cfg, self.tokenizer.vocab_size)
        self.augment_cfg = cfg.get("augment") or {}
        aux = cfg.get("aux") or {}
        # auxiliary head: simulator positions (object, bowl) regressed from obs_emb on frames that have them
        self.aux_dim, self.aux_weight = int(aux.get("dim", 0)), float(aux.get("weight", 0.0))
        self.aux_head = nn.Linear(cfg["width"], self.aux_dim) if self.aux_dim > 0 else None
        # targets standardised with the labelled frames' mean and std (std floored at aux.min_std: a
        # coordinate that never varies, e.g. the bowl's height, must not be blown up)
        self.register_buffer("aux_mean", torch.zeros(self.aux_dim))
        self.register_buffer("aux_std", torch.ones(self.aux_dim))
        labels = (stats or {}).get(PRIVILEGED_STATS_KEY)
        if self.aux_dim > 0 and labels is not None:
            self.aux_mean.copy_(torch.as_tensor(np.asarray(labels["mean"], np.float32)).reshape(self.aux_dim))
            std = torch.as_tensor(np.asarray(labels["std"], np.float32)).reshape(self.aux_dim)
            self.aux_std.copy_(std.clamp_min(float(aux.get("min_std", 0.0))))
        self.last_sft_terms: dict = {}  # detached flow / aux parts of the latest sft_loss, for logging
        self.expert = ActionExpert(cfg, learned_noise=self.noise_mode == "learned")
        self.value_head = nn.Sequential(nn.Linear(cfg["width"], cfg["value_hidden"]), nn.GELU(approximate="tanh"),
                                        nn.Linear(cfg["value_hidden"], 1))
        if self.noise_mode == "learned":
            nn.init.zeros_(self.expert.noise_out.weight)
            nn.init.constant_(self.expert.noise_out.bias,
                              flow.inverse_bounded_sigma(cfg["noise"]["sigma_init"], self.sigma_min, self.sigma_max))
        # Derived from the config, so not part of the weights.
        self.register_buffer("sigma_schedule", flow.scheduled_sigma(self.num_denoise_steps, self.sigma_min,
                                                                    self.sigma_max), persistent=False)

    # ----- observation ---------------------------------------------------------------------
    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        return self.tokenizer(instructions).to(self.device)

    def encode(self, obs: Obs, augment_images: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """obs_emb [B, D]. ``augment_images``: the config's ``augment`` (SFT batches only)."""
        tokens = obs["tokens"]
        if tokens.shape[1] > self.token_len:
            raise ValueError(f"tokens have length {tokens.shape[1]} > token_len {self.token_len}")
        state = obs.get("state")
        if state is not None and self.cfg["use_state"]:
            state = self.normalizer.normalize("state", state.float())
        else:
            state = None
        x = to_model_input(obs["image"], self.image_size)
        if augment_images:
            x = augment(x, self.augment_cfg, generator)
        return self.encoder(x, tokens, state)

    def value(self, obs: Obs) -> torch.Tensor:
        return self.value_head(self.encode(obs)).squeeze(-1)

    # ----- one denoising transition: x_{k+1} ~ N(x_k + dt * v(x_k, t_k), sigma_k^2) ----------
    def transition(self, x: torch.Tensor, step: torch.Tensor, obs_emb: torch.Tensor):
        """x [N,H,A], step [N] (long, 0..K-1), obs_emb [N,D] -> (mean, sigma), both [N,H,A]."""
        K = self.num_denoise_steps
        velocity, raw = self.expert(x, step.float() / K, obs_emb)
        mean = x + velocity / K
        if raw is not None:
            sigma = flow.bounded_sigma(raw, self.sigma_min, self.sigma_max)
        else:
            sigma = self.sigma_schedule[step][:, None, None].expand_as(mean)
        return mean, sigma

    def chain_transitions(self, obs_emb: torch.Tensor, chain: torch.Tensor):
        """All K transitions of stored chains in one batched pass -> mean, sigma [B,K,H,A]."""
        B, K1, H, A = chain.shape
        K = self.num_denoise_steps
        if K1 != K + 1 or H != self.chunk_size or A != self.action_dim:
            raise ValueError(f"chain shape {tuple(chain.shape)} != [B, {K + 1}, {self.chunk_size}, {self.action_dim}]")
        steps = torch.arange(K, device=chain.device).repeat(B)
        mean, sigma = self.transition(chain[:, :-1].reshape(B * K, H, A), steps, obs_emb.repeat_interleave(K, 0))
        return mean.view(B, K, H, A), sigma.view(B, K, H, A)

    # ----- RL --------------------------------------------------------------------------------
    def sample(self, obs: Obs, generator: Optional[torch.Generator] = None) -> SampleOutput:
        obs_emb = self.encode(obs)
        B = obs_emb.shape[0]
        chain, log_prob = flow.sample_chain(self._noise(B, obs_emb, generator), self.num_denoise_steps,
                                            lambda x, step: self.transition(x, step, obs_emb),
                                            lambda: self._noise(B, obs_emb, generator), self.chain_terms,
                                            self.stochastic_steps)
        return SampleOutput(actions=self.to_env_actions(chain[:, -1]), chain=chain, log_prob=log_prob,
                            value=self.value_head(obs_emb).squeeze(-1))

    def evaluate(self, obs: Obs, chain: torch.Tensor) -> EvaluateOutput:
        obs_emb = self.encode(obs)
        chain = chain.float()
        mean, sigma = self.chain_transitions(obs_emb, chain)
        log_prob = flow.chain_log_prob(chain, mean, sigma, self.chain_terms)
        entropy = flow.chain_entropy(sigma, self.chain_terms)
        return EvaluateOutput(log_prob=log_prob, value=self.value_head(obs_emb).squeeze(-1), entropy=entropy)

    # ----- supervised flow matching -------------------------------------------------------------
    def sft_loss(self, obs: Obs, actions: torch.Tensor, action_pad: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean flow-matching error over the chunk steps that ``action_pad`` does not mark, plus
        ``aux.weight`` times the auxiliary position error where ``obs["privileged"]`` has labels."""
        errors, obs_emb = self.sft_errors(obs, actions, generator, return_obs_emb=True)
        loss = flow.masked_mean(errors, action_pad)
        self.last_sft_terms = {"flow": loss.detach()}
        if self.aux_head is not None and self.aux_weight > 0 and obs.get("privileged") is not None:
            aux = self.aux_loss(obs_emb, obs["privileged"])
            self.last_sft_terms["aux"] = aux.detach()
            loss = loss + self.aux_weight * aux
        return loss

    def aux_loss(self, obs_emb: torch.Tensor, privileged: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the aux head on rows whose labels [B, aux_dim] are finite (NaN: none)."""
        target = (privileged.float() - self.aux_mean) / self.aux_std
        keep = torch.isfinite(target).all(-1)
        if not keep.any():
            return obs_emb.new_zeros(())
        return (self.aux_head(obs_emb[keep]).float() - target[keep]).pow(2).mean()

    def sft_errors(self, obs: Obs, actions: torch.Tensor, generator: Optional[torch.Generator] = None,
                   return_obs_emb: bool = False):
        """Per-step flow-matching error [B, H]: ||v(x_t, t) - (a - noise)||^2 / 7, a normalised.
        Images are augmented while the policy is in training mode."""
        obs_emb = self.encode(obs, augment_images=self.training, generator=generator)
        target_actions = self.normalizer.normalize("action", actions.float())
        B = target_actions.shape[0]
        noise = self._noise(B, obs_emb, generator)
        tc = self.time_cfg
        t = flow.sample_time(B, tc["dist"], tc["alpha"], tc["beta"], tc["t_max"], generator, obs_emb.device)
        x_t = flow.interpolate(noise, target_actions, t[:, None, None])
        velocity, _ = self.expert(x_t, t, obs_emb)
        errors = (velocity - flow.velocity_target(noise, target_actions)).pow(2).mean(-1)
        return (errors, obs_emb) if return_obs_emb else errors

    # ----- deterministic ODE -----------------------------------------------------------------
    def ode(self, obs_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The K Euler steps without noise from ``x`` [B, H, A] -> normalised actions [B, H, A]
        (differentiable; ``act`` runs it without gradient)."""
        B = obs_emb.shape[0]
        for k in range(self.num_denoise_steps):
            velocity, _ = self.expert(x, torch.full((B,), k / self.num_denoise_steps, device=x.device), obs_emb)
            x = x + velocity / self.num_denoise_steps
        return x

    @torch.no_grad()
    def act(self, obs: Obs, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Euler ODE over the same K steps without noise. Starts from x_0 = 0 (the noise mode), so it
        is deterministic; pass a ``generator`` to start from x_0 ~ N(0, I) instead."""
        obs_emb = self.encode(obs)
        B = obs_emb.shape[0]
        x = (self._noise(B, obs_emb, generator) if generator is not None
             else torch.zeros(B, self.chunk_size, self.action_dim, device=obs_emb.device))
        return self.to_env_actions(self.ode(obs_emb, x))

    # ----- helpers -----------------------------------------------------------------------------
    def _noise(self, B: int, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(B, self.chunk_size, self.action_dim, generator=generator, device=like.device)


    # ----- persistence -----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(self.cfg, f, indent=2)
        with open(os.path.join(path, STATS_FILE), "w") as f:
            json.dump(self.normalizer.to_lerobot_stats(), f, indent=2)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE))

    @classmethod
    def load(cls, path: str, map_location: str = "cpu", overrides: Optional[Mapping] = None) -> "CompactVLA":
        from safetensors.torch import load_file

        with open(os.path.join(path, CONFIG_FILE)) as f:
            cfg = merged(json.load(f), overrides)
        policy = cls(cfg)
        policy.load_state_dict(load_file(os.path.join(path, WEIGHTS_FILE)))
        return policy.to(map_location)
