"""benchmarks/sft_gradient_noise.py's measures: the trained weights, the flattened gradients, and the
signal estimate from independent draws."""
import pytest
import torch

from benchmarks.sft_gradient_noise import flat, pairwise, trainable
from common.config import load_config
from common.policy import make_policy


def test_the_measured_weights_are_those_stage_ii_trains():
    policy = make_policy(load_config("config", ["policy=tiny"]).policy)
    names = [n for n, _ in trainable(policy)]
    assert names and not any(n.startswith("encoder.") for n in names)
    assert all(not p.requires_grad for p in policy.encoder.parameters())
    params = trainable(policy)
    grads = {names[0]: torch.ones_like(params[0][1])}
    v = flat(grads, params)  # a weight without a gradient counts as zeros, in parameter order
    assert v.numel() == sum(p.numel() for _, p in params)
    assert float(v.sum()) == params[0][1].numel() and float(v[params[0][1].numel():].abs().sum()) == 0.0


def test_independent_draws_give_the_signal_and_its_share():
    signal = torch.tensor([3.0, 0.0, 0.0, 0.0])
    noise = [torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])]
    cos, dot = pairwise([signal + n for n in noise])
    assert dot == pytest.approx(9.0)  # orthogonal noise drops out of the pairwise dot: |signal|^2
    assert cos == pytest.approx(9.0 / 10.0)  # s^2 / (s^2 + sigma^2)
    cos, dot = pairwise(noise)
    assert cos == 0.0 and dot == 0.0
