"""benchmarks/random_direction.py's null policies: the change's per-tensor sizes, nothing else moved."""
import pytest
import torch

from benchmarks.random_direction import gaussian_direction, paired, scaled_change


def test_a_null_change_has_the_trained_change_s_size_per_tensor():
    start = {"frozen": torch.ones(3, 4), "moved": torch.zeros(5), "steps": torch.tensor(7)}
    trained = {"frozen": torch.ones(3, 4), "moved": torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0]), "steps": torch.tensor(9)}
    state, norms = scaled_change(start, trained, gaussian_direction(start, seed=0))
    assert torch.equal(state["frozen"], start["frozen"])  # unchanged in training: unchanged here
    assert torch.equal(state["steps"], start["steps"])  # not a float: never perturbed
    assert float((state["moved"] - start["moved"]).norm()) == pytest.approx(5.0, rel=1e-6)
    assert not torch.allclose(state["moved"], trained["moved"])  # a different direction of that size
    assert norms == {"moved": 5.0}
    state, _ = scaled_change(start, trained, {})  # no direction for a tensor: it stays
    assert torch.equal(state["moved"], start["moved"])


def test_paired_counts_flips_on_the_same_episodes():
    start = [{"env": "twin", "seed": s, "success": s < 2} for s in range(4)]
    after = [{"env": "twin", "seed": s, "success": s in (1, 3)} for s in range(4)]
    assert paired(start, after) == (1, 1)  # seed 3 newly solved, seed 0 newly failed
