"""Build a policy from the composed Hydra group ``cfg.policy`` or load a saved one.

Backends are registered by ``name`` as "module:Class" strings and imported lazily, so a backend
with heavy dependencies (pi0.5) costs nothing unless it is used.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

from common.imports import import_object

from .base import Policy

BACKENDS: dict[str, str] = {
    "compact_vla": "common.policy.compact_vla:CompactVLA",
    "pi05": "common.policy.pi05:Pi05Policy",
}


def register_backend(name: str, target: str) -> None:
    """``target`` is "package.module:ClassName" of a ``Policy`` subclass taking ``(cfg, stats)``."""
    BACKENDS[name] = target


def _backend(name: str) -> type[Policy]:
    if name not in BACKENDS:
        raise ValueError(f"unknown policy backend {name!r} (registered: {sorted(BACKENDS)})")
    return import_object(BACKENDS[name])


def plain_dict(cfg) -> dict:
    """A DictConfig (resolved) or mapping as a plain dict."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def make_policy(policy_cfg: Mapping, stats: Optional[Mapping] = None) -> Policy:
    """``policy_cfg``: the ``policy`` group (needs ``name``); ``stats``: a LeRobot ``meta.stats``."""
    cfg = plain_dict(policy_cfg)
    return _backend(cfg["name"])(cfg, stats)


def merged(cfg: dict, overrides: Optional[Mapping]) -> dict:
    """``cfg`` with ``overrides`` merged in, nested mappings key by key; a None value keeps the key."""
    out = dict(cfg)
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def load_policy(path: str, map_location: str = "cpu", overrides: Optional[Mapping] = None) -> Policy:
    """Rebuild a policy saved with ``policy.save(path)`` from its config.json and weights.
    ``overrides`` (e.g. ``{"noise": {"score": "executed"}}``) replace saved config values that do
    not change the architecture: RL-time settings of a Stage I policy."""
    with open(os.path.join(path, "config.json")) as f:
        name = json.load(f)["name"]
    return _backend(name).load(path, map_location=map_location, overrides=plain_dict(overrides or {}))
