"""What a peer may say about itself on the control channel: typed, bounded fields.

A hello or heartbeat carries a free map of status fields (counters, rates, mode, evaluation
results). The learner keeps them in its peer table, writes evaluation results into summary.json
and TensorBoard, and serves them to ``tandem-status``; so each field is checked here first:
scalar values only, finite numbers, short strings and names, a known ``mode``, and evaluation
results only from a peer that registered as an eval actor.
"""
from __future__ import annotations

import math
import re

MODES = ("train", "eval")  # actors.main: actor.mode
EVAL_ENVS = ("sim", "real_proxy")
MAX_FIELDS = 64
MAX_STRING = 128
MAX_INT = 2 ** 53  # exact in a float64 (JSON, TensorBoard)
MAX_EVAL_EPISODES = 1_000_000
FIELD_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")
EVAL_FIELDS = ("eval_success", "eval_episodes", "eval_env", "eval_version")


def _scalar_ok(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_INT
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_STRING


def sanitize_peer_meta(meta) -> tuple[dict, list[str]]:
    """(the fields kept, a reason per field dropped). Evaluation fields are kept as sent; see
    ``eval_report`` for whether they count."""
    if not isinstance(meta, dict):
        return {}, ["meta_not_a_map"]
    clean, rejected = {}, []
    for i, (key, value) in enumerate(meta.items()):
        if i >= MAX_FIELDS:
            rejected.append("too_many_fields")
            break
        if not isinstance(key, str) or not FIELD_NAME.fullmatch(key):
            rejected.append("bad_field_name")
        elif not _scalar_ok(value):
            rejected.append(f"bad_value:{key}")
        else:
            clean[key] = value
    if "mode" in clean and clean["mode"] not in MODES:
        rejected.append("bad_mode")
        del clean["mode"]
    return clean, rejected


def eval_report(meta: dict, registered_mode) -> dict:
    """An evaluation result from a heartbeat, checked; ValueError names what is wrong. Only a peer
    registered (at its first hello/heartbeat) with mode "eval" may report one."""
    if registered_mode != "eval":
        raise ValueError(f"eval result from a peer registered as {registered_mode!r}, not 'eval'")
    success, episodes = meta.get("eval_success"), meta.get("eval_episodes")
    if isinstance(success, bool) or not isinstance(success, (int, float)) or not 0.0 <= success <= 1.0:
        raise ValueError(f"eval_success {success!r} is not a rate in [0, 1]")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or not 1 <= episodes <= MAX_EVAL_EPISODES:
        raise ValueError(f"eval_episodes {episodes!r} is not a count in [1, {MAX_EVAL_EPISODES}]")
    env = meta.get("eval_env", "sim")
    if env not in EVAL_ENVS:
        raise ValueError(f"eval_env {env!r} is not one of {EVAL_ENVS}")
    version = meta.get("eval_version", -1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"eval_version {version!r} is not an integer")
    return {"env": env, "success": float(success), "episodes": episodes, "policy_version": version}
