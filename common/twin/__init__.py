"""The ManiSkill3 twin of the real cell: task, single-env wrapper, scripted expert, demo writer.

Importing this package registers the gymnasium id ``TandemPickPlace-v1``; the wrapper, expert and
demo writer are imported on first use.
"""
from common.dataset_schema import ACTION_KEY, IMAGE_KEY, STATE_KEY
from common.twin.task import TASK_ID, TandemPickPlaceEnv

_LAZY = {"TwinEnv": "wrappers", "make_env": "wrappers", "ScriptedExpert": "expert",
         "evaluate_expert": "expert", "write_demos": "demos"}

__all__ = ["TASK_ID", "TandemPickPlaceEnv", "IMAGE_KEY", "STATE_KEY", "ACTION_KEY", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"common.twin.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'common.twin' has no attribute {name!r}")
