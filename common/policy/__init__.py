"""Policies shared by the learner, the actors and the deployer (see ``base.Policy``)."""
from .base import EvaluateOutput, Obs, Policy, SampleOutput
from .compact_vla import CompactVLA
from .factory import load_policy, make_policy, register_backend
from .normalizer import Normalizer
from .tokenizer import ByteTokenizer

__all__ = ["Policy", "SampleOutput", "EvaluateOutput", "Obs", "CompactVLA", "make_policy", "load_policy",
           "register_backend", "Normalizer", "ByteTokenizer"]
