"""Benchmark of the pi0.5 backend with random weights: samples/s and peak GPU memory of sample,
evaluate, evaluate+backward and SFT+backward.

    python -m benchmarks.bench_pi05 --size tiny --device cpu                      # smoke test, seconds
    python -m benchmarks.bench_pi05 --size real --device cuda --batch-sizes 1 8 32 64

``--size real`` is configs/policy/pi05.yaml as is (PaliGemma 2B-class VLM: Gemma width 2048 x 18
layers + SigLIP so400m/14 at 224x224; Gemma 300M expert: width 1024 x 18 layers; bf16). The model is
built directly on the device. A small word-level tokenizer that splits digits as Gemma's does is
made in a temporary folder (the real one may add a separate "▁" before each state number: up to
max_state_dim more prompt tokens); the vocabulary size, and so the embedding, is the real one.
"eval+bwd" and "sft+bwd" are learner costs minus the optimiser, with the VLM frozen
(``train_expert_only``, the default) unless ``--train-vlm``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common.policy import make_policy

POLICY_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "policy"
TINY = ["dtype=float32", "image_size=32", "token_len=16", "max_state_dim=8", "max_action_dim=8", "value_hidden=32",
        "vision.width=32", "vision.depth=1", "vision.mlp_dim=64", "vision.heads=2", "vision.patch_size=8",
        "vlm.width=64", "vlm.depth=2", "vlm.mlp_dim=128", "vlm.heads=2", "vlm.head_dim=16", "vlm.vocab_size=320",
        "expert.width=32", "expert.depth=2", "expert.mlp_dim=64", "expert.heads=2", "expert.head_dim=16"]
INSTRUCTION = "put the red cube in the bowl"


def make_tokenizer(folder: Path) -> str:
    """A word-level fast tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) that splits
    numbers into digits as Gemma's does, so the state part of the prompt has about the real length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in INSTRUCTION.split() + ["Task", "State", "Action", ":", ",", ";"] + [str(d) for d in range(10)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return str(folder)


def with_overrides(cfg: dict, dotlist: list[str]) -> dict:
    """``a.b=value`` overrides (value parsed as YAML), without OmegaConf: the GPU host lacks it."""
    for item in dotlist:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[leaf] = yaml.safe_load(value)
    return cfg


def timed(fn, device, min_time: float, max_iters: int) -> tuple[float, float]:
    """(seconds per call after one warm-up call, peak memory in GiB or nan on CPU)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or iters >= max_iters:
            break
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return elapsed / iters, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16 for real, float32 for tiny")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--train-vlm", action="store_true", help="train the whole model (train_expert_only=false)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix at every denoising step")
    ap.add_argument("--image-hw", type=int, nargs=2, default=[480, 640], help="camera image size fed in")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per cell")
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--skip-backward", action="store_true")
    ap.add_argument("--json", type=str, default="", help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if args.size == "real" else "float32")
    overrides = (TINY if args.size == "tiny" else []) + [
        f"dtype={dtype}", f"train_expert_only={str(not args.train_vlm).lower()}",
        f"gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"kv_cache={str(not args.no_kv_cache).lower()}"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        overrides.append(f"tokenizer={make_tokenizer(Path(tmp) / 'tokenizer')}")
        cfg = with_overrides(yaml.safe_load((POLICY_CONFIGS / "pi05.yaml").read_text()), overrides)
        start = time.perf_counter()
        with device:  # allocate and initialise on the device (3B float32 parameters would be 12 GB of host RAM)
            policy = make_policy(cfg)
        build_s = time.perf_counter() - start
    policy.train()  # as in the learner; there is no dropout, so sampling is unaffected
    m = policy.model
    counts = {"vision": m.paligemma_with_expert.paligemma.model.vision_tower,
              "vlm": m.paligemma_with_expert.paligemma.model.language_model,
              "expert": m.paligemma_with_expert.gemma_expert}
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in counts.items()}
    counts["total"], counts["trainable"] = policy.num_parameters(), policy.num_parameters(trainable_only=True)
    obs_len = policy.prompt.length
    print(f"size={args.size} device={device} dtype={dtype} K={policy.num_denoise_steps} H={policy.chunk_size} "
          f"image {args.image_hw[0]}x{args.image_hw[1]}->{policy.image_size} prompt tokens={obs_len} "
          f"kv_cache={not args.no_kv_cache} grad_ckpt={args.gradient_checkpointing} built in {build_s:.1f}s")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if device.type == "cuda":
        print(f"weights on GPU: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")

    cells = ["sample", "evaluate"] + ([] if args.skip_backward else ["eval+bwd", "sft+bwd"])
    print(f"{'batch':>6} " + " ".join(f"{c:>20}" for c in cells) + "   (samples/s | peak GiB)")
    results = []
    for B in args.batch_sizes:
        obs = {"image": torch.randint(0, 256, (B, *args.image_hw, 3), dtype=torch.uint8, device=device),
               "tokens": policy.tokenize([INSTRUCTION] * B),
               "state": torch.randn(B, policy.state_dim, device=device)}
        with torch.no_grad():
            out = policy.sample(obs)
            gap = (policy.evaluate(obs, out.chain).log_prob - out.log_prob).abs().max().item()
        demo = torch.randn(B, policy.chunk_size, policy.action_dim, device=device)

        def sample():
            with torch.no_grad():
                policy.sample(obs)

        def evaluate():
            with torch.no_grad():
                policy.evaluate(obs, out.chain)

        def evaluate_bwd():
            ev = policy.evaluate(obs, out.chain)
            (ev.log_prob.sum() + ev.value.sum() + ev.entropy.sum()).backward()
            policy.zero_grad(set_to_none=True)

        def sft_bwd():
            policy.sft_loss(obs, demo).backward()
            policy.zero_grad(set_to_none=True)

        fns = {"sample": sample, "evaluate": evaluate, "eval+bwd": evaluate_bwd, "sft+bwd": sft_bwd}
        row = {"batch": B, "logprob_gap": gap}
        for c in cells:
            try:
                sec, peak = timed(fns[c], device, args.min_time, args.max_iters)
                row[c] = {"samples_per_s": B / sec, "peak_gib": peak}
            except torch.OutOfMemoryError:
                row[c] = {"samples_per_s": float("nan"), "peak_gib": float("inf")}
                torch.cuda.empty_cache()
        results.append(row)
        print(f"{B:>6} " + " ".join(f"{row[c]['samples_per_s']:>11.1f} | {row[c]['peak_gib']:>6.1f}" for c in cells)
              + f"   |sample - evaluate| log-prob {gap:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "parameters": counts, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
