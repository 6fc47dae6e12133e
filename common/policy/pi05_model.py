"""pi0.5's network on stock ``transformers``: a PaliGemma prefix (SigLIP + Gemma) and a Gemma action
expert whose RMSNorms are adaptive (adaRMS, conditioned on the flow time), sharing self-attention
layer by layer.

Module names reproduce lerobot's ``PI05Pytorch`` so that ``Pi05Model.state_dict()`` keys (under the
policy's ``model.`` prefix) are the keys of a LeRobot pi0.5 ``model.safetensors``:
  paligemma_with_expert.paligemma.model.vision_tower.vision_model.*   SiglipVisionModel
  paligemma_with_expert.paligemma.model.multi_modal_projector.linear  PaliGemma projector
  paligemma_with_expert.paligemma.model.language_model.*              GemmaModel (the VLM)
  paligemma_with_expert.paligemma.lm_head.weight                      tied to embed_tokens
  paligemma_with_expert.gemma_expert.model.layers.*                   GemmaModel layers, norms -> AdaRMSNorm
  action_in_proj, action_out_proj, time_mlp_in, time_mlp_out
plus our RL heads ``value_head.*`` and ``noise_head.*``, which LeRobot checkpoints do not have.

Attention is block-causal: prefix tokens (image, then prompt) attend to every valid prefix token;
action tokens attend to the valid prefix and to each other; the prefix never sees actions. So the
prefix's keys/values do not depend on the actions: computed once (``prefix_pass``), they serve
every denoising step (``expert_pass``), with the same result as the joint pass (``joint_pass``)
that recomputes everything. Differences from lerobot's forward, on purpose: SDPA with a boolean
mask (padded queries attend to the valid keys, so no row is fully masked) instead of eager
attention with an additive -2.4e38 mask; the sinusoidal time features are float32, not float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig, GemmaModel, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

from .layers import sinusoidal_embedding

# Parameters lerobot keeps in float32 when the rest is bfloat16 (substring match on the name).
FLOAT32_PARAMS = ("vision_tower.vision_model.embeddings.patch_embedding",
                  "vision_tower.vision_model.embeddings.position_embedding",
                  "input_layernorm", "post_attention_layernorm", "model.norm")


class AdaRMSNorm(nn.Module):
    """Gemma RMSNorm whose scale, shift and residual gate come from a conditioning vector (adaRMS):
    y = rms_norm(x) * (1 + scale) + shift, and the block's residual adds gate * f(y)."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)  # as openpi: starts as a plain (bias-modulated) RMSNorm

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        var = x.float().pow(2).mean(-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype))[:, None].float().chunk(3, dim=-1)
        return (normed * (1 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def _norm(norm: nn.Module, x: torch.Tensor, cond: Optional[torch.Tensor]):
    """(normed, gate): gate None for the VLM's plain Gemma RMSNorm."""
    if isinstance(norm, AdaRMSNorm):
        return norm(x, cond)
    return norm(x), None


def _gated(residual: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    return residual + (y if gate is None else y * gate)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer applied in its own dtype (bf16 mode keeps some layers float32)."""
    return layer(x.to(layer.weight.dtype))


def gemma_config(c: Mapping, vocab_size: int, rope_theta: float, eps: float) -> dict:
    return dict(hidden_size=c["width"], intermediate_size=c["mlp_dim"], num_hidden_layers=c["depth"],
                num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"],
                vocab_size=vocab_size, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=eps,
                rope_theta=rope_theta, max_position_embeddings=c.get("max_positions", 8192))


class GemmaExpert(nn.Module):
    """Holds the expert ``GemmaModel`` as ``.model`` (lerobot's ``gemma_expert.model.*`` keys) without
    the token embedding or LM head: the expert reads action embeddings, never token ids."""

    def __init__(self, cfg: Mapping, vocab_size: int, rope_theta: float, eps: float):
        super().__init__()
        self.model = GemmaModel(GemmaConfig(**gemma_config(cfg, vocab_size, rope_theta, eps)))
        self.model.embed_tokens = None
        W = cfg["width"]
        for layer in self.model.layers:
            layer.input_layernorm = AdaRMSNorm(W, W, eps)
            layer.post_attention_layernorm = AdaRMSNorm(W, W, eps)
        self.model.norm = AdaRMSNorm(W, W, eps)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: Mapping):
        super().__init__()
        vlm, vis, exp = cfg["vlm"], cfg["vision"], cfg["expert"]
        if vlm["depth"] != exp["depth"] or vlm["head_dim"] != exp["head_dim"] or vlm["kv_heads"] != exp["kv_heads"]:
            raise ValueError("the VLM and the expert share attention layer by layer: depth, head_dim and "
                             f"kv_heads must match (vlm {vlm}, expert {exp})")
        eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
        config = PaliGemmaConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=vis["width"],
                               intermediate_size=vis["mlp_dim"], num_hidden_layers=vis["depth"],
                               num_attention_heads=vis["heads"], patch_size=vis["patch_size"],
                               image_size=cfg["image_size"], projection_dim=vlm["width"],
                               layer_norm_eps=vis["layer_norm_eps"], vision_use_head=False),
            text_config=dict(model_type="gemma", **gemma_config(vlm, vlm["vocab_size"], theta, eps)),
            image_token_index=vlm["vocab_size"], projection_dim=vlm["width"])
        self.paligemma = PaliGemmaForConditionalGeneration(config)
        self.gemma_expert = GemmaExpert(exp, vlm["vocab_size"], theta, eps)

    @property
    def vlm(self) -> GemmaModel:
        return self.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.gemma_expert.model


@dataclass
class PrefixCache:
    """Per-layer post-RoPE keys/values of the prefix, its valid-token mask and last hidden states."""
    kv: list  # depth x (k [B, kv_heads, P, hd], v [B, kv_heads, P, hd])
    pad: torch.Tensor  # [B, P] bool, True = valid token
    hidden: Optional[torch.Tensor]  # [B, P, W_vlm] after the VLM's final norm (for the value head)

    def repeat_interleave(self, n: int) -> "PrefixCache":
        """Each row n times (for scoring n chain steps in one pass); the hidden states are not needed there."""
        return PrefixCache([(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv],
                           self.pad.repeat_interleave(n, 0), None)


class Pi05Model(nn.Module):
    def __init__(self, cfg: Mapping, learned_noise: bool):
        super().__init__()
        W, A = cfg["expert"]["width"], cfg["max_action_dim"]
        self.cfg = cfg
        self.paligemma_with_expert = PaliGemmaWithExpert(cfg)
        self.action_in_proj = nn.Linear(A, W)
        self.action_out_proj = nn.Linear(W, A)
        self.time_mlp_in = nn.Linear(W, W)
        self.time_mlp_out = nn.Linear(W, W)
        self.value_head = nn.Sequential(nn.Linear(cfg["vlm"]["width"], cfg["value_hidden"]),
                                        nn.GELU(approximate="tanh"), nn.Linear(cfg["value_hidden"], 1))
        self.noise_head = nn.Linear(W, cfg["action_dim"]) if learned_noise else None
        self.gradient_checkpointing = False

    # ----- precision and training switches ----------------------------------------------------
    def set_precision(self, dtype: str) -> None:
        """float32, or bfloat16 for the VLM and expert with lerobot's float32 exceptions; the
        projections and RL heads stay float32 (so the Gaussian math does)."""
        pwe = self.paligemma_with_expert
        if dtype == "float32":
            pwe.float()
        elif dtype == "bfloat16":
            pwe.to(torch.bfloat16)
            for name, p in pwe.named_parameters():
                if any(s in name for s in FLOAT32_PARAMS):
                    p.data = p.data.float()
        else:
            raise ValueError(f"unknown dtype {dtype!r} (float32 | bfloat16)")

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True
        self.paligemma_with_expert.paligemma.model.vision_tower.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.paligemma_with_expert.vlm.layers[0].self_attn.q_proj.weight.dtype

    # ----- embeddings -------------------------------------------------------------------------
    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] in [-1,1] -> [B, N_img, W_vlm]; pi0.5 does not rescale image features by
        1/sqrt(width) as stock PaliGemma's get_image_features does."""
        pg = self.paligemma_with_expert.paligemma.model
        # transformers 4.x wraps SigLIP's layers in ``.vision_model``; 5.x may not
        vm = getattr(pg.vision_tower, "vision_model", pg.vision_tower)
        # Piecewise, so the float32 patch/position embeddings feed bf16 layers in bf16 mode.
        h = vm.embeddings(pixels.to(vm.embeddings.patch_embedding.weight.dtype))
        h = vm.encoder(inputs_embeds=h.to(vm.post_layernorm.weight.dtype)).last_hidden_state
        return _linear(pg.multi_modal_projector.linear, vm.post_layernorm(h))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.paligemma_with_expert.vlm.embed_tokens(tokens)
        return emb * (emb.shape[-1] ** 0.5)  # Gemma's embedding scale, applied here (not in the layers)

    def embed_prefix(self, pixels: torch.Tensor, tokens: torch.Tensor):
        img = self.embed_image(pixels)
        txt = self.embed_tokens(tokens)
        embs = torch.cat([img.to(self.compute_dtype), txt.to(self.compute_dtype)], dim=1)
        pad = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool, device=img.device), tokens != 0], dim=1)
        return embs, pad

    def embed_suffix(self, x: torch.Tensor, t_pi0: torch.Tensor):
        """Noisy actions [N,H,A] (A <= max_action_dim, zero-padded) and pi0-convention times [N] ->
        action tokens [N,H,W] and the adaRMS condition [N,W]."""
        x = F.pad(x, (0, self.action_in_proj.in_features - x.shape[-1]))
        tc = self.cfg["time_embedding"]
        time_emb = sinusoidal_embedding(t_pi0, self.action_in_proj.out_features, tc["min_period"], tc["max_period"])
        cond = F.silu(_linear(self.time_mlp_out, F.silu(_linear(self.time_mlp_in, time_emb))))
        return _linear(self.action_in_proj, x).to(self.compute_dtype), cond

    # ----- transformer passes -------------------------------------------------------------------
    def _layer(self, i: int, prefix, suffix, cond, mask, cos, sin, past):
        """One layer of both towers with shared attention. prefix/suffix [B,T,W] or None;
        mask [B, Q, past + Q] bool; returns (prefix, suffix, (k, v) of this layer's new tokens)."""
        pwe = self.paligemma_with_expert
        streams = [(pwe.vlm.layers[i], prefix, None), (pwe.expert.layers[i], suffix, cond)]
        streams = [s for s in streams if s[1] is not None]
        qs, ks, vs, gates = [], [], [], []
        for layer, h, c in streams:
            x, gate = _norm(layer.input_layernorm, h, c)
            att = layer.self_attn
            shape = (*h.shape[:2], -1, att.head_dim)
            qs.append(_linear(att.q_proj, x).view(shape).transpose(1, 2))
            ks.append(_linear(att.k_proj, x).view(shape).transpose(1, 2))
            vs.append(_linear(att.v_proj, x).view(shape).transpose(1, 2))
            gates.append(gate)
        q, k, v = torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2)
        q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(v.dtype), v], 2)
        groups = q.shape[1] // k.shape[1]  # grouped-query attention: kv heads shared by query heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        out = out.transpose(1, 2).reshape(*q.shape[:1], q.shape[2], -1)
        results, start = [], 0
        for (layer, h, c), gate in zip(streams, gates):
            y = _linear(layer.self_attn.o_proj, out[:, start:start + h.shape[1]])
            start += h.shape[1]
            h = _gated(h, y.to(h.dtype), gate)
            x, gate2 = _norm(layer.post_attention_layernorm, h, c)
            h = _gated(h, layer.mlp(x.to(layer.mlp.up_proj.weight.dtype)).to(h.dtype), gate2)
            results.append(h)
        if prefix is None:
            results.insert(0, None)
        if suffix is None:
            results.append(None)
        return results[0], results[1], new_kv

    def _layers(self, prefix, suffix, cond, mask, positions, past_kv=None):
        pwe = self.paligemma_with_expert
        ref = prefix if prefix is not None else suffix
        cos, sin = pwe.vlm.rotary_emb(ref, positions)
        kv_out = []
        for i in range(len(pwe.vlm.layers)):
            past = None if past_kv is None else past_kv[i]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                prefix, suffix, kv = checkpoint(self._layer, i, prefix, suffix, cond, mask, cos, sin, past,
                                                use_reentrant=False)
            else:
                prefix, suffix, kv = self._layer(i, prefix, suffix, cond, mask, cos, sin, past)
            kv_out.append(kv)
        if prefix is not None:
            prefix = pwe.vlm.norm(prefix)
        if suffix is not None:
            suffix, _ = pwe.expert.norm(suffix, cond)
        return prefix, suffix, kv_out

    def prefix_pass(self, embs: torch.Tensor, pad: torch.Tensor) -> PrefixCache:
        """The VLM over the prefix alone (bidirectional among valid tokens) -> its KV cache."""
        positions = pad.long().cumsum(1) - 1
        mask = pad[:, None, :].expand(-1, pad.shape[1], -1)
        hidden, _, kv = self._layers(embs, None, None, mask, positions)
        return PrefixCache(kv, pad, hidden)

    def _suffix_mask_and_positions(self, pad: torch.Tensor, H: int):
        B, P = pad.shape
        positions = pad.long().sum(1, keepdim=True) + torch.arange(H, device=pad.device)
        mask = torch.cat([pad[:, None, :].expand(B, H, P), torch.ones(B, H, H, dtype=torch.bool, device=pad.device)], 2)
        return mask, positions

    def expert_pass(self, cache: PrefixCache, x: torch.Tensor, t_pi0: torch.Tensor) -> torch.Tensor:
        """Action tokens through the expert against the cached prefix -> expert output [N,H,W]."""
        suffix, cond = self.embed_suffix(x, t_pi0)
        mask, positions = self._suffix_mask_and_positions(cache.pad, x.shape[1])
        _, out, _ = self._layers(None, suffix, cond, mask, positions, past_kv=cache.kv)
        return out

    def joint_pass(self, embs: torch.Tensor, pad: torch.Tensor, x: torch.Tensor, t_pi0: torch.Tensor):
        """Prefix and action tokens in one pass with the block-causal mask (as lerobot's training
        forward) -> (prefix hidden [B,P,W_vlm], expert output [B,H,W])."""
        suffix, cond = self.embed_suffix(x, t_pi0)
        B, P = pad.shape
        H = x.shape[1]
        s_mask, s_pos = self._suffix_mask_and_positions(pad, H)
        no_actions = torch.zeros(B, P, H, dtype=torch.bool, device=pad.device)  # the prefix never sees actions
        p_mask = torch.cat([pad[:, None, :].expand(B, P, P), no_actions], 2)
        mask = torch.cat([p_mask, s_mask], 1)
        positions = torch.cat([pad.long().cumsum(1) - 1, s_pos], 1)
        prefix, out, _ = self._layers(embs, suffix, cond, mask, positions)
        return prefix, out

    # ----- heads ------------------------------------------------------------------------------
    def value(self, hidden: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Value from the mean of the prefix's last hidden states over valid tokens (RLinf's
        value_after_vlm) -> [B] float32."""
        w = pad.to(torch.float32)[..., None]
        pooled = (hidden.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.value_head(pooled).squeeze(-1)

    def action_out(self, out: torch.Tensor, action_dim: int):
        """Expert output -> (pi0-convention velocity [N,H,action_dim], raw noise level or None), float32."""
        out = out.float()
        velocity = self.action_out_proj(out)[..., :action_dim]
        raw = None if self.noise_head is None else self.noise_head(out)
        return velocity, raw
