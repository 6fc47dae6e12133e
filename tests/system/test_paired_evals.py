"""benchmarks.paired_evals: arms against a baseline on the seeds every policy evaluated."""
import json

import pytest

from benchmarks.paired_evals import compare, main


def result(outcomes: dict, env: str = "twin") -> dict:
    return {"episodes": [{"env": env, "seed": s, "success": ok, "length": 10, "return": float(ok), "shape": "cube"}
                         for s, ok in outcomes.items()]}


def test_paired_change_counts_flips_on_the_shared_seeds(tmp_path):
    base = result({s: s < 4 for s in range(10)})          # 4 / 10
    arm = result({s: 2 <= s < 8 for s in range(12)})      # seeds 10-11 not in the baseline: ignored
    rows = compare(("base", base), [("arm", arm)])["twin"]
    assert rows["base"]["success"] == pytest.approx(0.4) and rows["base"]["episodes"] == 10
    assert rows["arm"]["episodes"] == 10 and rows["arm"]["success"] == pytest.approx(0.6)
    assert rows["arm"]["change"] == pytest.approx(0.2)
    assert (rows["arm"]["gained"], rows["arm"]["lost"]) == (4, 2)  # seeds 4-7 newly solved, 0-1 newly failed
    lo, hi = rows["arm"]["change_ci95"]
    assert lo <= 0.2 <= hi and lo < hi


def test_cli_writes_table_json_and_plot(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(result({s: s % 2 == 0 for s in range(6)})))
    (tmp_path / "b.json").write_text(json.dumps(result({s: True for s in range(6)})))
    assert main(["--base", f"A={tmp_path / 'a.json'}", "--arm", f"B={tmp_path / 'b.json'}", "--out", str(tmp_path / "o")]) == 0
    assert "| twin | B | 1.00" in (tmp_path / "o" / "paired_evals.md").read_text()
    assert json.loads((tmp_path / "o" / "paired_evals.json").read_text())["twin"]["B"]["gained"] == 3
    assert (tmp_path / "o" / "paired_evals.png").stat().st_size > 0


def test_disjoint_seeds_are_an_error():
    with pytest.raises(ValueError, match="no twin seed"):
        compare(("base", result({0: True})), [("arm", result({1: True}))])
