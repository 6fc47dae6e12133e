"""Config dataclasses for device backends, built from Hydra groups, and lazy backend lookup.

Each backend (arm, camera, teleop) has a config dataclass with a ``type`` name, in the manner of
LeRobot's ``RobotConfig``/``CameraConfig``; here they are filled from the composed Hydra config
rather than from draccus, and backends are imported only when chosen, so a missing optional
driver (pyspacemouse, a display for pynput) costs nothing unless it is used.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Mapping

from common.imports import import_object


def to_plain(cfg: Any) -> dict:
    """A plain dict of a DictConfig (resolved) or any mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


class DeviceConfig:
    """Base of every backend config dataclass."""

    type: ClassVar[str] = ""

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None):
        """Build from a mapping; unknown keys raise (typos in a yaml must not pass silently)."""
        values = to_plain(cfg or {})
        values.pop("type", None)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown} (known: {sorted(names)})")
        return cls(**values)


def load_backend(registry: Mapping[str, str], kind: str, what: str):
    """The class registered as "package.module:Class" under ``kind``."""
    if kind not in registry:
        raise ValueError(f"unknown {what} type {kind!r} (known: {sorted(registry)})")
    return import_object(registry[kind])
