"""bench_gpu.py's profile phase on the CPU with FakeTwinEnv (issue #20): the figures the next GPU
session reads, per variant, from one results.json."""
import json

import pytest

from benchmarks import bench_gpu


def test_profile_phase_splits_each_workers_time_per_variant(tmp_path):
    step_ms = 5.0  # FakeTwinEnv sleeps this long per env step: its "physics"
    bench_gpu.main(["--out", str(tmp_path), "--env", "fake", "--device", "cpu", "--policy", "tiny", "--image", "32",
                    "--fake-step-cost", str(step_ms / 1000), "--envs", "2", "--phases", "profile",
                    "--warmup", "1", "--duration", "3",
                    "--variant", "base", "--variant", "pinned", "actor.server.cpu_affinity=auto"])
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["profile"]
    assert [(r["variant"], r["envs"]) for r in rows] == [("base", 2), ("pinned", 2)]
    assert [r["pinned"] for r in rows] == [False, True]  # the variant's override reached the server
    for r in rows:
        p = r["profile"]
        assert r["env_steps_per_s"] > 0 and p["env_steps"] > 0
        assert p["calls_per_step"]["physics"] == pytest.approx(1.0, abs=0.1)
        assert step_ms <= p["ms_per_step"]["physics"] < p["wall_ms_per_step"]  # a sleep never ends early
        assert p["ms_per_step"]["wait_server"] > 0
        # the sections (with "other", the unmeasured rest) add up to each worker's wall time per step
        assert sum(p["ms_per_step"].values()) == pytest.approx(p["wall_ms_per_step"])
        assert sum(p["batch_hist"].values()) == sum(p["batches_by_size"].values()) > 0
        assert r["logp_gap_fp32"] < 1e-3  # a float32 server: its segments are on-policy for a float32 learner
    md = (tmp_path / "results.md").read_text()
    assert "| base, 2 |" in md and "| pinned, 2 |" in md
    assert (tmp_path / "profile.png").exists()
