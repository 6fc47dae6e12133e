"""Hydra config helpers shared by every process command.

Every ``tandem-*`` command composes ``configs/<name>.yaml`` and applies the command line's
``key=value`` overrides (Hydra syntax), without Hydra changing the working directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from common.local_ipc import register_resolver

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides such as ``learner.lr=1e-4``."""
    register_resolver()  # transport.ipc_dir
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def load_policy_preset(preset: str, dotlist: Sequence[str] = ()) -> dict:
    """``configs/policy/<preset>.yaml`` composed with its defaults (the compact presets share
    ``compact_vla_common.yaml``), then ``dotlist`` (e.g. ``noise.mode=scheduled``) merged in, as a dict."""
    policy = load_config("config", [f"policy={preset}"]).policy
    return OmegaConf.to_container(OmegaConf.merge(policy, OmegaConf.from_dotlist(list(dotlist))), resolve=True)


# Errors a user can act on (a bad value, a missing file or device, an absent learner): one line
# naming the problem, no traceback (TANDEM_TRACEBACK=1 shows it).
USER_ERRORS = (ValueError, RuntimeError, FileNotFoundError, ConnectionError, ImportError, KeyError)
USER_ERROR_EXIT = 2
LEARNER_STOPPED_ON_TRAIN_ERRORS = 3  # learner.main's exit code after max_consecutive_train_errors


def _help_text(prog: str, config_name: str) -> str:
    doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
    usage = f"usage: {prog} [--cfg] [key=value ...]   (Hydra overrides of configs/{config_name}.yaml; --cfg prints it)"
    return f"{usage}\n\n{doc}" if doc else usage


def run_with_config(fn: Callable[[DictConfig], int | None], config_name: str = "config",
                    argv: Sequence[str] | None = None) -> int:
    """Entry-point body: parse overrides from argv, ``--cfg`` prints the composed config, ``--help``
    the command's own description; a user error ends in one line and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = Path(sys.argv[0]).name
    if args and args[0] in ("-h", "--help"):
        print(_help_text(prog, config_name))
        return 0
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    cfg = load_config(config_name, args)
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        return int(fn(cfg) or 0)
    except USER_ERRORS as e:
        if os.environ.get("TANDEM_TRACEBACK"):
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"[{prog}] error ({type(e).__name__}): {text}\n"
              f"[{prog}] (TANDEM_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT
