#!/usr/bin/env python3
"""Time a PyTorch CPU training step (forward + loss + backward) for a random Qwen2.

Same model shape and token count as the Rust criterion bench (benches/), so the two
numbers can be compared. Nothing is downloaded: the model is built from Qwen2Config.

    python3 tools/bench_torch_cpu.py [--threads N] [--attn eager|sdpa|both] [--steps 10]

One step = zero grads, forward, mean next-token cross-entropy over the logits,
backward. Prints one human line per attention implementation and one JSON line each.
"""

import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (at least 10 recommended)")
    p.add_argument("--attn", choices=["eager", "sdpa", "both"], default="both",
                   help="attention implementation(s) to time; eager is reported first")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(a, attn):
    config = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(a.seq, 512),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": a.rope_theta, "rope_type": "default"},
        tie_word_embeddings=False,
        use_sliding_window=False,
        use_cache=False,
    )
    config._attn_implementation = attn
    torch.manual_seed(a.seed)
    model = Qwen2ForCausalLM(config).float()
    model.train()
    return model


def bench(a, attn):
    model = build_model(a, attn)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(a.seed + 1)
    input_ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)

    def step():
        model.zero_grad(set_to_none=False)
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1, :].reshape(-1, a.vocab), input_ids[:, 1:].reshape(-1)
        )
        loss.backward()
        return loss.item()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)

    tokens = a.batch * a.seq
    median = statistics.median(times)
    result = {
        "bench": "torch_cpu_fwd_bwd",
        "attn": attn,
        "threads": torch.get_num_threads(),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "median_step_ms": median * 1e3,
        "mean_step_ms": statistics.mean(times) * 1e3,
        "min_step_ms": min(times) * 1e3,
        "max_step_ms": max(times) * 1e3,
        "steps": a.steps,
        "warmup": a.warmup,
        "loss": loss,
        "params": n_params,
        "shape": {
            "hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "heads": a.heads,
            "kv_heads": a.kv_heads, "vocab": a.vocab, "batch": a.batch, "seq": a.seq,
            "rope_theta": a.rope_theta,
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(
        f"torch cpu fwd+bwd: {result['tokens_per_s']:.1f} tokens/s "
        f"(median step {result['median_step_ms']:.1f} ms, threads {result['threads']}, attn {attn})",
        flush=True,
    )
    print(json.dumps(result), flush=True)
    return result


def main():
    a = parse_args()
    if a.steps < 1:
        raise SystemExit("--steps must be >= 1")
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    attns = ["eager", "sdpa"] if a.attn == "both" else [a.attn]
    with torch.autograd.set_grad_enabled(True):
        for attn in attns:
            bench(a, attn)


if __name__ == "__main__":
    main()
