"""Hydra config helpers shared by every process command.

Every ``tandem-*`` command composes ``configs/<name>.yaml`` and applies the command line's
``key=value`` overrides (Hydra syntax), without Hydra changing the working directory.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides such as ``learner.lr=1e-4``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def run_with_config(fn: Callable[[DictConfig], int | None], config_name: str = "config",
                    argv: Sequence[str] | None = None) -> int:
    """Entry-point body: parse overrides from argv, ``--cfg`` prints the composed config."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        prog = Path(sys.argv[0]).name
        print(f"usage: {prog} [--cfg] [key=value ...]   (Hydra overrides of configs/{config_name}.yaml)")
        return 0
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    cfg = load_config(config_name, args)
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    return int(fn(cfg) or 0)
