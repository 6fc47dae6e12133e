"""tandem-report: TensorBoard scalars (and summary.json eval history) of several runs -> report.md + PNGs."""
import json
import re

import numpy as np
import pytest

from learner.metrics import MetricsWriter
from tools.report import main, read_scalars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UPDATES = 20
COTRAIN_TAGS = ["train/ppo_loss", "train/sft_loss", "actor/total_loss", "train/loss_ratio",
                "policy_lag/mean", "policy_lag/max", "throughput/sim_samples_per_s"]
PPO_TAGS = ["train/ppo_loss", "actor/total_loss", "policy_lag/mean", "policy_lag/max", "throughput/sim_samples_per_s"]
COTRAIN_SIM_SUCCESS = {5: 0.25, 10: 0.75, 15: 1.0, 20: 0.5}  # final 0.5, best 1.0
PPO_EVAL_HISTORY = [{"env": "sim", "success": 0.1, "update": 10, "episodes": 4},
                    {"env": "sim", "success": 0.3, "update": 20, "episodes": 4},
                    {"env": "real_proxy", "success": 0.0, "update": 20, "episodes": 4}]


def write_run(run_dir, tags, eval_tb=None, summary=None):
    writer = MetricsWriter(run_dir / "tb")
    for step in range(1, UPDATES + 1):
        writer.log({tag: 1.0 / step + i for i, tag in enumerate(tags)}, step)
    for step, value in (eval_tb or {}).items():
        writer.log({"eval/sim_success": value, "eval/real_proxy_success": value / 2}, step)
    writer.close()
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    cotrain = write_run(tmp_path / "cotrain", COTRAIN_TAGS, eval_tb=COTRAIN_SIM_SUCCESS,
                        summary={"updates": UPDATES, "co_training": True, "eval_history": []})
    ppo = write_run(tmp_path / "ppo", PPO_TAGS,
                    summary={"updates": UPDATES, "co_training": False, "eval_history": PPO_EVAL_HISTORY})
    return cotrain, ppo


def section(markdown: str, title: str) -> str:
    return re.split(r"\n## ", markdown.split(f"\n## {title}\n", 1)[1])[0]


def test_report_of_two_runs(runs, tmp_path):
    out = tmp_path / "out"
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    md = (out / "report.md").read_text()

    cotrain, ppo = section(md, "cotrain"), section(md, "ppo")
    for tag in COTRAIN_TAGS + ["eval/sim_success", "eval/real_proxy_success"]:
        assert f"`{tag}`" in cotrain
    for tag in PPO_TAGS + ["eval/sim_success", "eval/real_proxy_success"]:  # eval from summary.json
        assert f"`{tag}`" in ppo
    assert "`train/sft_loss`" not in ppo and "`train/loss_ratio`" not in ppo and "sft/loss" not in md
    # final / best: the eval curve's last value and its maximum; a loss's best is its minimum
    assert re.search(r"\| twin success \| `eval/sim_success` \| 0\.5 \| 1 \|", cotrain)
    assert re.search(r"\| twin success \| `eval/sim_success` \| 0\.3 \| 0\.3 \|", ppo)
    assert re.search(rf"\| PPO loss \| `train/ppo_loss` \| {1 / UPDATES:.4g} \| {1 / UPDATES:.4g} \| .* \| {UPDATES} \| {UPDATES} \|", ppo)
    comparison = section(md, "Comparison")
    assert "| cotrain | 0.5 / 1 | 0.25 / 0.5 | True | 20 |" in comparison
    assert "| ppo | 0.3 / 0.3 | 0 / 0 | False | 20 |" in comparison

    import matplotlib.pyplot as plt
    expected = ["success.png", "losses.png", "policy_lag.png", "throughput.png"]
    for name in expected:
        path = out / name
        assert f"]({name})" in md
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        image = plt.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100 and np.ptp(image) > 0
    assert not (out / "sft_loss.png").exists()  # no run logged sft/loss: no empty figure


def test_resumed_run_keeps_the_last_write_of_a_step(tmp_path):
    run = tmp_path / "resumed"
    write_run(run, ["train/ppo_loss"])  # steps 1..UPDATES with value 1/step
    writer = MetricsWriter(run / "tb")  # a restart from a checkpoint at step UPDATES - 1 writes it again
    writer.log({"train/ppo_loss": 42.0}, UPDATES - 1)
    writer.close()
    series = read_scalars(run)["train/ppo_loss"]
    assert series.steps.tolist() == list(range(1, UPDATES))
    assert series.values[-1] == 42.0


def test_missing_run_dir_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
