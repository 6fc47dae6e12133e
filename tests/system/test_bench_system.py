"""The system benchmark's arithmetic (benchmarks/bench_system.py): the figures its PASS/FAIL rests on."""
import math

import numpy as np
import pytest

from benchmarks.bench_system import histogram_quantile, rate


def test_lag_quantiles_from_the_learners_histogram():
    assert histogram_quantile(np.array([42, 14, 0]), 0.5) == 0  # most segments at lag 0
    assert histogram_quantile(np.array([42, 14, 0]), 0.9) == 1
    assert histogram_quantile(np.array([1, 2, 1]), 0.5) == 1
    assert histogram_quantile(np.array([0, 0, 3]), 0.5) == 2
    assert math.isnan(histogram_quantile(np.zeros(3, int), 0.5))


def test_rate_sums_actors_over_their_own_windows():
    first = {"a": {"env_steps": 100, "t": 10.0}, "b": {"env_steps": 0, "t": 11.0}}
    last = {"a": {"env_steps": 160, "t": 40.0}, "b": {"env_steps": 90, "t": 41.0},
            "c": {"env_steps": 500, "t": 41.0}}  # joined mid-window: no first sample, not counted
    assert rate(first, last, "env_steps") == pytest.approx(60 / 30 + 90 / 30)
