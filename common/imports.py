"""``"package.module:Name"`` strings (backend registries, checkpoints, env factories) -> the object."""
from __future__ import annotations

import importlib


def import_object(target: str):
    """The object a ``"package.module:Qual.Name"`` string names (nested names allowed)."""
    module, sep, qualname = target.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"{target!r} is not of the form 'package.module:Name'")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
