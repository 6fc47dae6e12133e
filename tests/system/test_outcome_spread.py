"""benchmarks.outcome_spread: the between-layout share of binary outcomes and the per-layout summary."""
import numpy as np
import pytest

from benchmarks.outcome_spread import between_layout_share, summarize


def test_all_or_nothing_layouts_put_all_the_variance_between_layouts():
    outcomes = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], float)
    assert between_layout_share(outcomes) == pytest.approx(1.0)


def test_independent_coin_flips_put_none_of_it_between_layouts():
    rng = np.random.default_rng(0)
    shares = [between_layout_share((rng.random((200, 4)) < 0.3).astype(float)) for _ in range(20)]
    # without the finite-repeat correction the share would sit near 1/R = 0.25
    assert abs(np.mean(shares)) < 0.03


def test_a_known_mixture_recovers_its_between_layout_share():
    # half the layouts succeed with p = 0.1, half with 0.5: between variance 0.04, total 0.3 * 0.7 = 0.21
    rng = np.random.default_rng(1)
    p = np.repeat([0.1, 0.5], 2000)[:, None]
    share = between_layout_share((rng.random((4000, 8)) < p).astype(float))
    assert share == pytest.approx(0.04 / 0.21, abs=0.02)


def test_summary_counts_layouts_and_splits_by_the_deterministic_outcome():
    repeats = 2
    episodes = []
    for seed, det, stoch in [(10, True, [1, 1]), (11, False, [0, 1]), (12, False, [0, 0])]:
        episodes.append({"seed": seed, "sample_seed": None, "success": det})
        episodes += [{"seed": seed, "sample_seed": seed * repeats + r, "success": bool(v)} for r, v in enumerate(stoch)]
    s = summarize(episodes, repeats)
    assert (s["layouts_never"], s["layouts_sometimes"], s["layouts_always"]) == (1, 1, 1)
    assert s["deterministic_success"] == pytest.approx(1 / 3) and s["stochastic_success"] == pytest.approx(0.5)
    assert s["stochastic_success_where_deterministic_succeeds"] == 1.0
    assert s["stochastic_success_where_deterministic_fails"] == pytest.approx(0.25)
