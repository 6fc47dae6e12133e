"""Image encoders of the compact VLA and the training-time image augmentation.

``KeypointCNN`` (Diffusion Policy's recipe, scaled down): a GroupNorm CNN whose last feature map
goes through a 1x1 conv to ``keypoints`` heat maps and a spatial softmax; each heat map becomes
the expected (x, y) image coordinate of its feature. Coordinates are explicit numbers in [-1, 1],
so the layers after it read positions directly instead of having to find them in a pooled
vector (the perception probe in shared/LEARNING.md: a ViT readout of the same size memorised
training layouts and localised nothing on new ones; this design got ~1 cm).

``random_shift`` (DrQ): pad by ``pad`` pixels (edge replicate) and crop back at a random offset
per image, done as one batched ``grid_sample``. ``color_jitter``: per-image brightness and
contrast factors. Both run only on SFT batches; RL re-evaluation sees the images as rendered.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def to_model_input(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,H,W,3] of any size -> float [B,3,size,size] in [-1, 1]."""
    x = image.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


class SpatialSoftmax(nn.Module):
    """[B, C, h, w] feature map -> [B, K, 2] expected (x, y) of K learned heat maps, in [-1, 1]."""

    def __init__(self, channels: int, keypoints: int):
        super().__init__()
        self.to_heatmaps = nn.Conv2d(channels, keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        maps = self.to_heatmaps(features).float()
        B, K, h, w = maps.shape
        attn = torch.softmax(maps.flatten(2) / self.log_temperature.exp(), dim=-1)  # [B, K, h*w]
        ys = torch.linspace(-1.0, 1.0, h, device=maps.device)
        xs = torch.linspace(-1.0, 1.0, w, device=maps.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)  # (x, y) per cell
        return attn @ grid


class KeypointCNN(nn.Module):
    """GroupNorm conv stack -> spatial-softmax keypoints -> flat [B, 2K] coordinates."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], keypoints: int, groups: int):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"vision.channels {list(channels)} and vision.strides {list(strides)} differ in length")
        layers, c_in = [], 3
        for i, (c, s) in enumerate(zip(channels, strides)):
            k = 5 if i == 0 else 3
            layers += [nn.Conv2d(c_in, c, k, stride=s, padding=k // 2), nn.GroupNorm(min(groups, c), c), nn.SiLU()]
            c_in = c
        self.backbone = nn.Sequential(*layers)
        self.keypoints = SpatialSoftmax(c_in, keypoints)
        self.out_dim = 2 * keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.keypoints(self.backbone(x)).flatten(1)


def random_shift(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each image of [B,3,S,S] by an integer offset in [-pad, pad] per axis, edges replicated."""
    if pad <= 0:
        return x
    B, _, S, _ = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    shift = torch.randint(0, 2 * pad + 1, (B, 1, 1, 2), generator=generator, device=x.device).to(x.dtype)
    # grid over the padded image: identity crop at offset `pad`, plus the random shift (in pixels)
    eps = 1.0 / (S + 2 * pad)
    base = torch.linspace(-1.0 + eps, 1.0 - eps, S + 2 * pad, device=x.device, dtype=x.dtype)[:S]
    grid = torch.stack(torch.meshgrid(base, base, indexing="xy"), -1)[None].expand(B, S, S, 2)
    grid = grid + shift * (2.0 / (S + 2 * pad))
    return F.grid_sample(padded, grid, mode="nearest", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-image brightness offset and contrast factor, both uniform in +-strength, on [-1, 1] images."""
    if strength <= 0:
        return x
    B = x.shape[0]
    u = torch.rand(B, 2, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * (1 + strength * u[:, 0]) + mean + strength * u[:, 1]).clamp(-1.0, 1.0)


def augment(x: torch.Tensor, cfg: Mapping, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The policy config's ``augment`` block ({shift_pad, color}) applied to model-input images."""
    x = random_shift(x, int(cfg.get("shift_pad", 0)), generator)
    return color_jitter(x, float(cfg.get("color", 0.0)), generator)
