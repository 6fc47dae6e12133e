"""The pi0.5 backend at a tiny random size on the CPU: LeRobot checkpoint layout, KV cache, RL
log-probabilities, SFT, freezing. The tokenizer is a small word-level one made here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.policy import load_policy, make_policy
from common.policy.pi05 import Pi05Policy
from paths import REPO_ROOT

POLICY_CONFIGS = REPO_ROOT / "configs" / "policy"
INSTRUCTIONS = ["put the red cube in the bowl", "pick up the green block", "", "place it in the bowl please"]
STATS = {
    "action": {"mean": np.linspace(-0.1, 0.1, 7), "std": np.linspace(0.05, 0.5, 7)},
    "observation.state": {"mean": np.linspace(-0.5, 0.5, 8), "std": [0.5] * 8},
}
TINY = [  # a few layers, width 32-64, 32x32 image with patch 8 (16 image tokens)
    "dtype=float32", "train_expert_only=false", "image_size=32", "token_len=16", "chunk_size=6", "exec_horizon=3",
    "num_denoise_steps=3", "max_state_dim=8", "max_action_dim=8", "value_hidden=32",
    "vision.width=32", "vision.depth=1", "vision.mlp_dim=64", "vision.heads=2", "vision.patch_size=8",
    "vlm.width=64", "vlm.depth=2", "vlm.mlp_dim=128", "vlm.heads=2", "vlm.kv_heads=1", "vlm.head_dim=16",
    "vlm.vocab_size=320",
    "expert.width=32", "expert.depth=2", "expert.mlp_dim=64", "expert.heads=2", "expert.kv_heads=1", "expert.head_dim=16",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A word-level fast tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) that, like
    Gemma's, splits numbers into single digits (so state bins take 1 to 3 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in INSTRUCTIONS for w in text.split()} | {"Task", "State", "Action", ":", ",", ";"})
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in words + [str(d) for d in range(10)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    path = tmp_path_factory.mktemp("tok") / "paligemma_tokenizer"
    fast.save_pretrained(str(path))
    return str(path)


def tiny_cfg(tokenizer_dir: str, *dotlist: str) -> dict:
    cfg = OmegaConf.merge(OmegaConf.load(POLICY_CONFIGS / "pi05.yaml"),
                          OmegaConf.from_dotlist(TINY + [f"tokenizer={tokenizer_dir}", *dotlist]))
    return OmegaConf.to_container(cfg, resolve=True)


def make_tiny(tokenizer_dir: str, *dotlist: str, seed: int = 0) -> Pi05Policy:
    torch.manual_seed(seed)
    policy = make_policy(tiny_cfg(tokenizer_dir, *dotlist), stats=STATS).eval()
    with torch.no_grad():  # random weights where pi0.5 initialises to zero, so every path matters
        for p in policy.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(std=0.3)
    return policy


def make_obs(policy, batch: int, seed: int = 0, hw=(24, 40)) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (batch, *hw, 3), generator=g, dtype=torch.uint8),
            "tokens": policy.tokenize([INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]),
            "state": torch.randn(batch, 8, generator=g)}


def test_prompt_is_pi05s_with_the_discretised_state(tokenizer_dir):
    policy = make_tiny(tokenizer_dir)
    tok = policy.prompt.tok
    ids = policy.tokenize(["put_the red cube\n"])
    assert ids.shape == (1, policy.token_len) and ids[0, 0] == tok.bos_token_id
    state = torch.tensor([[-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]])
    bins = policy.prompt.discretize(state)[0].tolist()
    # np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1, after clamping to [-1, 1]
    assert bins == (np.digitize(state.clamp(-1, 1).numpy()[0], np.linspace(-1, 1, 257)[:-1]) - 1).tolist()
    assert bins[:2] == [0, 0] and bins[-2:] == [255, 255] and bins[3] == 128
    full = policy.prompt.full_tokens(ids, state)
    text = tok.decode([i for i in full[0].tolist() if i != 0], skip_special_tokens=True)
    assert text.split() == ["Task", ":", "put", "the", "red", "cube", ",", "State", ":",
                            *[d for b in bins for d in str(b)], ";", "Action", ":"]
    assert policy.prompt.bin_tokens.shape == (256, 3)  # "7" is one token, "255" three (padded with 0)
    # without the state: the bare instruction (pi0's prompt) and no numbers
    no_state = make_tiny(tokenizer_dir, "use_state=false")
    ids = no_state.tokenize(["put the red cube"])
    assert no_state.prompt.full_tokens(ids, state).shape == ids.shape
    assert tok.decode(ids[0], skip_special_tokens=True).split() == ["put", "the", "red", "cube"]


def test_module_keys_follow_lerobot_layout(tokenizer_dir, tmp_path):
    policy = make_tiny(tokenizer_dir)
    policy.save(str(tmp_path / "ckpt"))
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    pg = "model.paligemma_with_expert.paligemma.model."
    for key in [pg + "vision_tower.vision_model.embeddings.patch_embedding.weight",
                pg + "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                pg + "multi_modal_projector.linear.weight",
                pg + "language_model.layers.1.mlp.gate_proj.weight", pg + "language_model.norm.weight",
                "model.paligemma_with_expert.paligemma.lm_head.weight",
                "model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight",
                "model.paligemma_with_expert.gemma_expert.model.layers.1.post_attention_layernorm.dense.bias",
                "model.paligemma_with_expert.gemma_expert.model.norm.dense.weight",
                "model.action_in_proj.weight", "model.action_out_proj.bias", "model.time_mlp_in.weight",
                "model.time_mlp_out.bias", "model.value_head.0.weight", "model.noise_head.weight"]:
        assert key in keys, key
    assert pg + "language_model.embed_tokens.weight" not in keys  # tied: stored once, as lm_head
    assert not any("gemma_expert.lm_head" in k or "gemma_expert.model.embed_tokens" in k for k in keys)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["type"] == "pi05" and cfg["name"] == "pi05" and cfg["max_action_dim"] == 8


def test_save_load_gives_identical_outputs(tokenizer_dir, tmp_path):
    policy = make_tiny(tokenizer_dir)
    obs = make_obs(policy, 3)
    policy.save(str(tmp_path / "ckpt"))
    loaded = load_policy(str(tmp_path / "ckpt"))
    assert isinstance(loaded, Pi05Policy)
    assert torch.equal(policy.act(obs), loaded.act(obs))
    with torch.no_grad():
        a = policy.sample(obs, generator=torch.Generator().manual_seed(7))
        b = loaded.sample(obs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.chain, b.chain) and torch.equal(a.log_prob, b.log_prob) and torch.equal(a.value, b.value)
    assert torch.equal(loaded.normalizer.action_std, policy.normalizer.action_std)
    assert torch.equal(loaded.tokenize(INSTRUCTIONS), policy.tokenize(INSTRUCTIONS))  # tokenizer saved alongside


def _lerobot_file(policy, tmp_path, mutate=None) -> str:
    """A LeRobot-format checkpoint made from ``policy``: openpi keys incl. the expert's unused LM head."""
    from safetensors.torch import save_file

    from common.policy.pi05_checkpoint import to_file_state

    state = {k: v for k, v in to_file_state(policy).items()
             if not k.startswith(("model.value_head", "model.noise_head", "normalizer."))}
    state["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(320, 32)
    if mutate:
        mutate(state)
    path = tmp_path / "lerobot_pi05"
    path.mkdir(exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 6, "num_inference_steps": 3}))
    return str(path)


def test_loads_a_lerobot_checkpoint(tokenizer_dir, tmp_path):
    src = make_tiny(tokenizer_dir, seed=0)
    obs = make_obs(src, 2)
    path = _lerobot_file(src, tmp_path)
    dst = make_tiny(tokenizer_dir, f"checkpoint={path}", seed=1)
    with torch.no_grad():  # RL heads are not in LeRobot checkpoints: align them, then all must agree
        dst.model.value_head.load_state_dict(src.model.value_head.state_dict())
        dst.model.noise_head.load_state_dict(src.model.noise_head.state_dict())
    assert torch.equal(src.act(obs), dst.act(obs))
    assert torch.equal(src.value(obs), dst.value(obs))

    def strip_model_prefix(state):  # openpi's own export: the same keys without "model."
        for k in list(state):
            state[k[len("model."):]] = state.pop(k)
    path = _lerobot_file(src, tmp_path, strip_model_prefix)
    assert torch.equal(make_tiny(tokenizer_dir, f"checkpoint={path}", seed=1).act(obs), src.act(obs))


def test_bad_checkpoint_keys_are_all_listed(tokenizer_dir, tmp_path):
    policy = make_tiny(tokenizer_dir)
    q = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"
    head = "model.paligemma_with_expert.paligemma.lm_head.weight"

    def break_it(state):
        del state["model.time_mlp_in.bias"]
        state["model.state_proj.weight"] = torch.zeros(32, 8)  # a pi0 key
        state[q] = torch.zeros(7, 32)
    path = _lerobot_file(policy, tmp_path, break_it)
    with pytest.raises(ValueError) as err:
        make_tiny(tokenizer_dir, f"checkpoint={path}")
    msg = str(err.value)
    assert "missing keys (1): ['model.time_mlp_in.bias']" in msg
    assert "unexpected keys (1): ['model.state_proj.weight']" in msg
    assert f"{q}: (7, 32)" in msg and "expected (32, 32)" in msg

    path = _lerobot_file(policy, tmp_path, lambda s: s.pop(head))
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['model\.paligemma_with_expert\.paligemma\.lm_head"):
        make_tiny(tokenizer_dir, f"checkpoint={path}")
    # our own checkpoints are strict about the RL heads too
    policy.save(str(tmp_path / "ours"))
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "ours" / "model.safetensors"))
    del state["model.value_head.2.bias"]
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.value_head\.2\.bias"):
        load_policy(str(tmp_path / "ours"))


@pytest.mark.parametrize("mode", ["learned", "scheduled"])
def test_sample_log_prob_equals_evaluate(tokenizer_dir, mode):
    policy = make_tiny(tokenizer_dir, f"noise.mode={mode}")
    obs = make_obs(policy, 4)
    with torch.no_grad():
        out = policy.sample(obs, generator=torch.Generator().manual_seed(1))
        ev = policy.evaluate(obs, out.chain)
    K, H = policy.num_denoise_steps, policy.chunk_size
    assert out.chain.shape == (4, K + 1, H, 7) and out.actions.shape == (4, H, 7)
    torch.testing.assert_close(out.log_prob, ev.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.value, ev.value, atol=1e-5, rtol=0)
    # scoring a different chain gives a different log-probability
    assert (policy.evaluate(obs, out.chain.flip(0)).log_prob - out.log_prob).abs().min() > 1e-2
    if mode == "learned":  # the noise level varies, so a wrong sigma would show
        with torch.no_grad():
            _, sigma = policy.chain_transitions(policy.prefix_cache(obs), out.chain)
        assert sigma.std() > 0.01


def test_kv_cache_matches_recomputing_the_prefix(tokenizer_dir):
    cached = make_tiny(tokenizer_dir)
    joint = make_tiny(tokenizer_dir, "kv_cache=false")
    obs = make_obs(cached, 3)
    with torch.no_grad():
        a = cached.sample(obs, generator=torch.Generator().manual_seed(3))
        b = joint.sample(obs, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.chain, b.chain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.log_prob, b.log_prob, atol=1e-3, rtol=0)
    assert a.chain[:, -1].std() > 0.1  # non-trivial actions


def test_padding_and_batch_composition_do_not_leak(tokenizer_dir):
    policy = make_tiny(tokenizer_dir)
    obs = make_obs(policy, 4)
    with torch.no_grad():
        chain = policy.sample(obs).chain
        full = policy.evaluate(obs, chain)
        for i in range(4):
            one = policy.evaluate({k: v[i:i + 1] for k, v in obs.items()}, chain[i:i + 1])
            torch.testing.assert_close(one.log_prob, full.log_prob[i:i + 1], atol=1e-3, rtol=0)
            torch.testing.assert_close(one.value, full.value[i:i + 1], atol=1e-5, rtol=0)
        # padding is masked and skipped by the positions: fewer padding columns, same results
        used = int((obs["tokens"] != 0).sum(1).max())
        assert used < policy.token_len
        short = dict(obs, tokens=obs["tokens"][:, :used])
        torch.testing.assert_close(policy.value(short), full.value, atol=1e-5, rtol=0)
        a, b = policy.prefix_cache(obs), policy.prefix_cache(short)
        torch.testing.assert_close(b.hidden[b.pad], a.hidden[a.pad], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(policy.act(short), policy.act(obs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(policy.evaluate(short, chain).log_prob, full.log_prob, atol=1e-3, rtol=0)


def test_sft_loss_goes_down_on_a_fixed_batch(tokenizer_dir):
    policy = make_tiny(tokenizer_dir).train()
    obs = make_obs(policy, 4, seed=3)
    demo = torch.randn(4, policy.chunk_size, 7, generator=torch.Generator().manual_seed(4)) * 0.2
    pad = torch.zeros(4, policy.chunk_size, dtype=torch.bool)
    pad[0, -2:] = True

    def eval_loss():
        with torch.no_grad():
            big = {k: v.repeat(4, *[1] * (v.dim() - 1)) for k, v in obs.items()}
            return policy.sft_loss(big, demo.repeat(4, 1, 1), pad.repeat(4, 1), generator=torch.Generator().manual_seed(5)).item()

    loss0 = eval_loss()
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        loss = policy.sft_loss(obs, demo, pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1 = eval_loss()
    assert loss1 < loss0 / 2, (loss0, loss1)  # ~2.2x in 60 steps here


def test_train_expert_only_freezes_the_vlm(tokenizer_dir):
    policy = make_tiny(tokenizer_dir, "train_expert_only=true").train()
    obs = make_obs(policy, 2)
    with torch.no_grad():
        chain = policy.sample(obs).chain
    ev = policy.evaluate(obs, chain)
    (ev.log_prob.sum() + ev.value.sum() + policy.sft_loss(obs, torch.randn(2, policy.chunk_size, 7))).backward()
    named = dict(policy.named_parameters())
    vlm = [n for n in named if n.startswith("model.paligemma_with_expert.paligemma.")]
    assert vlm and all(not named[n].requires_grad and named[n].grad is None for n in vlm)
    trained = [n for n in named if not n.startswith("model.paligemma_with_expert.paligemma.")]
    assert all(named[n].grad is not None and named[n].grad.abs().max() > 0 for n in trained), \
        [n for n in trained if named[n].grad is None or named[n].grad.abs().max() == 0]
    assert not policy.model.paligemma_with_expert.paligemma.training and policy.model.action_in_proj.training


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer_dir):
    grads = []
    for flag in ("false", "true"):
        policy = make_tiny(tokenizer_dir, f"gradient_checkpointing={flag}").train()
        obs = make_obs(policy, 2)
        loss = policy.sft_loss(obs, torch.ones(2, policy.chunk_size, 7), generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_bfloat16_keeps_lerobots_float32_exceptions(tokenizer_dir):
    policy = make_tiny(tokenizer_dir, "dtype=bfloat16")
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert dtypes["model.paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight"] == torch.float32
    assert dtypes["model.action_in_proj.weight"] == torch.float32
    obs = make_obs(policy, 2)
    with torch.no_grad():
        out = policy.sample(obs, generator=torch.Generator().manual_seed(0))
        ev = policy.evaluate(obs, out.chain)
    assert out.chain.dtype == torch.float32 and torch.isfinite(out.chain).all()
    torch.testing.assert_close(out.log_prob, ev.log_prob, atol=1e-2, rtol=1e-4)


def test_interface_attributes_and_weights_round_trip(tokenizer_dir):
    src, dst = make_tiny(tokenizer_dir, seed=0), make_tiny(tokenizer_dir, seed=1)
    assert (src.chunk_size, src.exec_horizon, src.num_denoise_steps, src.token_len, src.state_dim,
            src.image_size) == (6, 3, 3, 16, 8, 32)
    obs = make_obs(src, 2, hw=(48, 64))
    assert not torch.equal(src.act(obs), dst.act(obs))
    weights = src.get_weights()
    assert "model.paligemma_with_expert.paligemma.lm_head.weight" in weights
    assert not any(k.endswith("embed_tokens.weight") for k in weights)  # tied: sent once
    dst.set_weights(weights)
    assert torch.equal(src.act(obs), dst.act(obs))
    assert dst.model.paligemma_with_expert.vlm.embed_tokens.weight is dst.model.paligemma_with_expert.paligemma.lm_head.weight
    with pytest.raises(ValueError, match="use_state"):
        src.value(dict(obs, state=None))


def test_quantile_normalisation_maps_q01_q99_to_minus_one_one(tokenizer_dir):
    q01, q99 = np.linspace(-1.0, -0.1, 7), np.linspace(0.2, 2.0, 7)
    stats = {"action": {"mean": np.zeros(7), "std": np.ones(7), "q01": q01, "q99": q99}}
    torch.manual_seed(0)
    policy = make_policy(tiny_cfg(tokenizer_dir, "normalization=quantiles"), stats=stats)
    z = policy.normalizer.normalize("action", torch.tensor(np.stack([q01, q99]), dtype=torch.float32))
    torch.testing.assert_close(z, torch.tensor([[-1.0] * 7, [1.0] * 7]), atol=1e-5, rtol=0)
