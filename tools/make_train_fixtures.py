#!/usr/bin/env python3
"""Independent PyTorch references for the one-step training-update tests.

Run from anywhere (paths are resolved relative to the repository root):

    python3 tools/make_train_fixtures.py

Reads the tiny model tests/fixtures/tiny-qwen2-a/ (f32, tied embeddings, vocab 448)
and writes tests/fixtures/train/:

  em_rollouts.jsonl                    2 records {"prompt_ids", "completion_ids"}
                                       (seeded random ids in [0, 397))
  empo_rollouts.jsonl                  3 records {"prompt", "completions"} (text, G=4)
  em.expected.safetensors              parameters after one SGD step, case `em`
  empo_token_mean.expected.safetensors             ... case EMPO, token-mean
  empo_seq_mean_token_mean.expected.safetensors    ... case EMPO, seq-mean-token-mean

Definitions (shared by all cases)
---------------------------------
A sequence is prompt_ids ++ completion_ids (no special tokens, no EOS). Completion
token C[j] is scored by the logits at position p-1+j, divided by the temperature T:
logpi = log_softmax(logits/T)[C[j]], H = entropy of softmax(logits/T) over all 448
vocab rows (padding rows included). Every sequence is run alone (batch 1, no padding).

em:    T=0.5, loss = mean of H over every completion token of the step,
       w' = w - 0.5 * grad.
empo:  reward = |cluster of the last \\boxed{...} answer| / G (no answer -> 0, no
       cluster); semantic entropy over the answered completions (natural log);
       keep a group iff 0.05 <= SE <= 10; A = (r - mean) / (std_unbiased + 1e-6);
       PPO-clip (eps 0.2) with logpi_old = logpi.detach() (T=0.8),
       l_t = -min(ratio*A, clamp(ratio, 0.8, 1.2)*A);
       token-mean or seq-mean-token-mean over the kept groups; w' = w - 0.5 * grad.

Each expected file stores every parameter after the step (f32, HF names; the tied
lm_head is only model.embed_tokens.weight and gets both gradients) plus string
metadata: lr, temperature, loss (pre-step, repr of the f32 value), num_tokens,
grad_norm (pre-step global L2 over all parameter gradients, accumulated in f64),
loss_f64 / grad_norm_f64 (the same step recomputed in float64 by an independent
hand-written Qwen2 forward, as a cross-check; the script also checks its gradient
against a central finite difference along a random direction),
and for empo rewards / advantages / semantic_entropies / kept_records etc.

Everything runs on the CPU in float32 with fixed seeds; the output is byte-identical
across runs (a minimal deterministic safetensors writer with sorted keys is used).
"""

import json
import math
import os
import random
import struct
import sys

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

from tokenizers import Tokenizer  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny-qwen2-a")
OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "train")

LR = 0.5
NUM_BPE_IDS = 397  # ids [0, 397) are ordinary tokens; 397..399 special, 400..447 pad

# --- em -------------------------------------------------------------------------
EM_SEED = 20240601
EM_TEMP = 0.5
EM_PROMPT_LENS = [4, 6]
EM_NUM_COMPLETIONS = 3
EM_MIN_LEN, EM_MAX_LEN = 2, 7

# --- empo -----------------------------------------------------------------------
EMPO_TEMP = 0.8
CLIP_EPS = 0.2
ADV_EPS = 1e-6
ENTROPY_MIN = 0.05
ENTROPY_MAX = 10.0
EMPO_RECORDS = [
    {
        "prompt": "What is 1+1?",
        "completions": [
            " The answer is \\boxed{2}.",
            " \\boxed{2}",
            " 1+1=3, so \\boxed{3}.",
            " I am not sure.",
        ],
    },
    {
        "prompt": "Compute 2+3.",
        "completions": [
            " 2+3 is \\boxed{5}.",
            " \\boxed{5}",
            " The answer is \\boxed{5}.",
            " \\boxed{7}",
        ],
    },
    {
        "prompt": "What is 2+2?",
        "completions": [
            " It is \\boxed{4}.",
            " \\boxed{4}",
            " 2+2 is \\boxed{4}.",
            " The answer is \\boxed{4}.",
        ],
    },
]
EXPECTED_ANSWERS = [["2", "2", "3", None], ["5", "5", "5", "7"], ["4", "4", "4", "4"]]
MAX_TEXT_TOKENS = 20


# ----------------------------------------------------------------------------------
# I/O helpers
# ----------------------------------------------------------------------------------


def save_safetensors(path, tensors, metadata):
    """Deterministic safetensors writer: tensors and metadata keys sorted, f32 only."""
    header = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    chunks = []
    pos = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        raw = t.numpy().tobytes()  # little-endian on every supported host
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in chunks:
            f.write(raw)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, separators=(", ", ": "), ensure_ascii=True) + "\n")


def jdump(obj):
    return json.dumps(obj, separators=(",", ":"))


# ----------------------------------------------------------------------------------
# Model / scoring
# ----------------------------------------------------------------------------------


class HFScorer:
    """The reference proper: transformers' Qwen2ForCausalLM, eager attention, float32."""

    dtype = torch.float32

    def __init__(self):
        model = Qwen2ForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()  # attention_dropout is 0 anyway; no other stochastic layers
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight is model.model.embed_tokens.weight
        self.model = model
        self.vocab = model.config.vocab_size
        # named_parameters() de-duplicates shared tensors: the tied lm_head appears once,
        # as model.embed_tokens.weight, and accumulates both gradients.
        self.params = dict(model.named_parameters())
        assert "lm_head.weight" not in self.params

    def logits(self, ids):
        x = torch.tensor([ids], dtype=torch.long)
        return self.model(input_ids=x, use_cache=False).logits[0]


class F64Scorer:
    """Independent hand-written Qwen2 forward in float64 (cross-check only).

    transformers' Qwen2 upcasts RMSNorm and the attention softmax to float32 even for a
    float64 model, so loading it in float64 does not give a float64 reference; this
    does (rotary tables included)."""

    dtype = torch.float64

    def __init__(self):
        from safetensors.torch import load_file

        with open(os.path.join(MODEL_DIR, "config.json")) as f:
            cfg = json.load(f)
        self.cfg = cfg
        self.vocab = cfg["vocab_size"]
        raw = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
        self.params = {k: v.to(torch.float64).requires_grad_(True) for k, v in sorted(raw.items())}
        assert "lm_head.weight" not in self.params and cfg["tie_word_embeddings"]

    def _rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]) * w

    def logits(self, ids):
        cfg, P = self.cfg, self.params
        n = len(ids)
        nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg["hidden_size"] // nh
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)  # [n, hd]
        cos, sin = ang.cos(), ang.sin()

        def rope(t):  # [heads, n, hd]
            t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        causal = torch.ones(n, n, dtype=torch.bool).tril()
        h = P["model.embed_tokens.weight"][torch.tensor(ids, dtype=torch.long)]
        for i in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            x = self._rms(h, P[pre + "input_layernorm.weight"])
            q = x @ P[pre + "self_attn.q_proj.weight"].T + P[pre + "self_attn.q_proj.bias"]
            k = x @ P[pre + "self_attn.k_proj.weight"].T + P[pre + "self_attn.k_proj.bias"]
            v = x @ P[pre + "self_attn.v_proj.weight"].T + P[pre + "self_attn.v_proj.bias"]
            q = rope(q.view(n, nh, hd).transpose(0, 1))
            k = rope(k.view(n, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, dim=0)
            v = v.view(n, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
            s = (q @ k.transpose(1, 2)) / math.sqrt(hd)
            s = s.masked_fill(~causal, float("-inf"))
            a = torch.softmax(s, dim=-1) @ v  # [nh, n, hd]
            a = a.transpose(0, 1).reshape(n, nh * hd)
            h = h + a @ P[pre + "self_attn.o_proj.weight"].T
            x = self._rms(h, P[pre + "post_attention_layernorm.weight"])
            g = x @ P[pre + "mlp.gate_proj.weight"].T
            u = x @ P[pre + "mlp.up_proj.weight"].T
            h = h + (torch.nn.functional.silu(g) * u) @ P[pre + "mlp.down_proj.weight"].T
        h = self._rms(h, P["model.norm.weight"])
        return h @ P["model.embed_tokens.weight"].T


def make_scorer(dtype):
    return HFScorer() if dtype == torch.float32 else F64Scorer()


def completion_logits(scorer, prompt_ids, completion_ids, temp):
    """Tempered logits [c, V] at positions p-1 .. p+c-2 (the ones that score C)."""
    p, c = len(prompt_ids), len(completion_ids)
    assert p >= 1 and c >= 1
    logits = scorer.logits(list(prompt_ids) + list(completion_ids))  # [p+c, V]
    assert logits.shape == (p + c, scorer.vocab) and logits.dtype == scorer.dtype
    return logits[p - 1 : p - 1 + c] / temp


def token_logprobs(z, completion_ids):
    logp = torch.log_softmax(z, dim=-1)
    idx = torch.tensor(completion_ids, dtype=torch.long).unsqueeze(1)
    return logp.gather(1, idx).squeeze(1)


def token_entropies(z):
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def sgd_step(scorer, loss):
    params = scorer.params
    for p in params.values():
        p.grad = None
    loss.backward()
    grads = {}
    for name, p in params.items():
        assert p.grad is not None, f"no gradient for {name}"
        grads[name] = p.grad.detach().clone()
    gn = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    with torch.no_grad():
        new = {name: (p.detach() - LR * grads[name]).clone() for name, p in params.items()}
        old = {name: p.detach().clone() for name, p in params.items()}
    return new, old, grads, gn


# ----------------------------------------------------------------------------------
# em
# ----------------------------------------------------------------------------------


def make_em_rollouts():
    rng = random.Random(EM_SEED)
    records = []
    for p_len in EM_PROMPT_LENS:
        prompt = [rng.randrange(NUM_BPE_IDS) for _ in range(p_len)]
        lens = rng.sample(range(EM_MIN_LEN, EM_MAX_LEN + 1), EM_NUM_COMPLETIONS)
        comps = [[rng.randrange(NUM_BPE_IDS) for _ in range(n)] for n in lens]
        records.append({"prompt_ids": prompt, "completion_ids": comps})
    return records


def em_loss(scorer, records):
    ents = []
    for r in records:
        for c in r["completion_ids"]:
            ents.append(token_entropies(completion_logits(scorer, r["prompt_ids"], c, EM_TEMP)))
    h = torch.cat(ents)
    return h.mean(), h.numel()


def run_em(records):
    out = {}
    for dtype in (torch.float32, torch.float64):
        scorer = make_scorer(dtype)
        loss, n = em_loss(scorer, records)
        new, old, grads, gn = sgd_step(scorer, loss)
        out[dtype] = dict(loss=loss.item(), n=n, new=new, old=old, grads=grads, gn=gn)
    return out


# ----------------------------------------------------------------------------------
# empo
# ----------------------------------------------------------------------------------


def last_boxed(text):
    """Content of the last \\boxed{...} (brace-balanced), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth == 0:
            return text[i : j - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def empo_group_stats(completions):
    g = len(completions)
    answers = [last_boxed(t) for t in completions]
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    rewards = [(counts[a] / g) if a is not None else 0.0 for a in answers]
    answered = sum(counts.values())
    se = 0.0
    for k in sorted(counts):
        pc = counts[k] / answered
        se -= pc * math.log(pc)
    se = abs(se)  # turn -0.0 into 0.0 for a single cluster
    mean = sum(rewards) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (g - 1))
    adv = [(r - mean) / (std + ADV_EPS) for r in rewards]
    keep = ENTROPY_MIN <= se <= ENTROPY_MAX
    return dict(answers=answers, counts=counts, rewards=rewards, se=se, adv=adv, keep=keep)


def tokenize_empo(tok, records):
    out = []
    for r in records:
        p = tok.encode(r["prompt"], add_special_tokens=False).ids
        cs = [tok.encode(c, add_special_tokens=False).ids for c in r["completions"]]
        assert 1 <= len(p) < MAX_TEXT_TOKENS, (r["prompt"], len(p))
        for c, t in zip(cs, r["completions"]):
            assert 1 <= len(c) < MAX_TEXT_TOKENS, (t, len(c))
            assert tok.decode(c) == t, (tok.decode(c), t)
            assert all(i < NUM_BPE_IDS for i in c)
        out.append({"prompt_ids": p, "completion_ids": cs})
    return out


def empo_token_losses(scorer, tokenized, stats, dtype, fixed_old=None):
    """List (per kept sequence) of per-token PPO-clip losses l_t.

    lp_old is lp.detach() (on-policy first step); `fixed_old` (a list of tensors, one
    per kept sequence) overrides it, used only by the finite-difference check."""
    per_seq = []
    for rec, st in zip(tokenized, stats):
        if not st["keep"]:
            continue
        for c, a in zip(rec["completion_ids"], st["adv"]):
            z = completion_logits(scorer, rec["prompt_ids"], c, EMPO_TEMP)
            lp = token_logprobs(z, c)
            lp_old = lp.detach() if fixed_old is None else fixed_old[len(per_seq)]
            ratio = torch.exp(lp - lp_old)
            adv = torch.tensor(a, dtype=dtype)  # f64 advantage rounded to the scorer dtype
            s1 = ratio * adv
            s2 = torch.clamp(ratio, 1.0 - CLIP_EPS, 1.0 + CLIP_EPS) * adv
            per_seq.append(-torch.minimum(s1, s2))
    return per_seq


def empo_aggregate(per_seq, agg):
    n = sum(x.numel() for x in per_seq)
    if agg == "token-mean":
        return torch.cat(per_seq).sum() / n, n
    if agg == "seq-mean-token-mean":
        return torch.stack([x.mean() for x in per_seq]).mean(), n
    raise ValueError(agg)


def empo_old_logprobs(scorer, tokenized, stats):
    with torch.no_grad():
        return [
            token_logprobs(completion_logits(scorer, rec["prompt_ids"], c, EMPO_TEMP), c)
            for rec, st in zip(tokenized, stats) if st["keep"]
            for c in rec["completion_ids"]
        ]


def run_empo(tokenized, stats, agg):
    out = {}
    for dtype in (torch.float32, torch.float64):
        scorer = make_scorer(dtype)
        per_seq = empo_token_losses(scorer, tokenized, stats, dtype)
        loss, n = empo_aggregate(per_seq, agg)
        new, old, grads, gn = sgd_step(scorer, loss)
        out[dtype] = dict(loss=loss.item(), n=n, nseq=len(per_seq), new=new, old=old, grads=grads, gn=gn)
    return out


# ----------------------------------------------------------------------------------
# finite-difference cross-check (float64)
# ----------------------------------------------------------------------------------


def fd_check(case, loss_fn, grads64, h=1e-6, seed=7):
    """Central difference of loss_fn along a random unit direction vs <grad, d> (f64)."""
    scorer = F64Scorer()
    params = scorer.params
    gen = torch.Generator().manual_seed(seed)
    dirs = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in dirs.values()))
    dirs = {k: d / norm for k, d in dirs.items()}
    analytic = sum(float((grads64[k] * dirs[k]).sum()) for k in params)
    vals = []
    with torch.no_grad():
        base = {k: p.detach().clone() for k, p in params.items()}
        for sgn in (1.0, -1.0):
            for k, p in params.items():
                p.copy_(base[k] + sgn * h * dirs[k])
            vals.append(float(loss_fn(scorer)))
        for k, p in params.items():
            p.copy_(base[k])
    numeric = (vals[0] - vals[1]) / (2 * h)
    rel = abs(numeric - analytic) / max(abs(analytic), 1e-12)
    print(f"  fd check (f64, random direction): analytic {analytic:.10e} numeric {numeric:.10e} rel {rel:.2e}")
    assert rel < 1e-6, (case, analytic, numeric)


# ----------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------


def check_names(new):
    from safetensors import safe_open

    with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert set(new) == names, (sorted(set(new) ^ names))


def summarize(case, res):
    r32, r64 = res[torch.float32], res[torch.float64]
    dmax = max(float((r32["new"][k] - r32["old"][k]).abs().max()) for k in r32["new"])
    gdiff = max(float((r32["grads"][k].double() - r64["grads"][k]).abs().max()) for k in r32["grads"])
    gscale = max(float(r64["grads"][k].abs().max()) for k in r64["grads"])
    wdiff = max(float((r32["new"][k].double() - r64["new"][k]).abs().max()) for k in r32["new"])
    print(f"[{case}]")
    print(f"  loss f32 = {r32['loss']!r}   f64 = {r64['loss']!r}")
    print(f"  grad_norm f32 = {r32['gn']!r}   f64 = {r64['gn']!r}")
    print(f"  num_tokens = {r32['n']}")
    print(f"  max |w'-w| = {dmax:.6e}")
    print(f"  f32 vs f64: max |grad diff| = {gdiff:.3e} (max |grad| {gscale:.3e}), max |w' diff| = {wdiff:.3e}")
    # sanity: the step actually moved things and f32 agrees with f64
    assert dmax > 1e-4, dmax
    assert gdiff <= 1e-4 * max(gscale, 1.0), gdiff
    assert abs(r32["loss"] - r64["loss"]) <= 1e-5 * max(1.0, abs(r64["loss"]))


def base_meta(temp, res):
    r32, r64 = res[torch.float32], res[torch.float64]
    return {
        "lr": repr(LR),
        "temperature": repr(temp),
        "loss": repr(r32["loss"]),
        "num_tokens": str(r32["n"]),
        "grad_norm": repr(r32["gn"]),
        "loss_f64": repr(r64["loss"]),
        "grad_norm_f64": repr(r64["gn"]),
        "model": "tiny-qwen2-a",
        "optimizer": "sgd (w - lr*grad), no clipping, no weight decay",
    }


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))

    # ---- em ----
    em_records = make_em_rollouts()
    write_jsonl(os.path.join(OUT_DIR, "em_rollouts.jsonl"), em_records)
    em = run_em(em_records)
    check_names(em[torch.float32]["new"])
    meta = base_meta(EM_TEMP, em)
    meta["loss_type"] = "entropy token-mean over all completion tokens"
    meta["rollouts"] = "em_rollouts.jsonl"
    save_safetensors(os.path.join(OUT_DIR, "em.expected.safetensors"), em[torch.float32]["new"], meta)
    print("em rollouts:")
    for i, r in enumerate(em_records):
        print(f"  record {i}: prompt len {len(r['prompt_ids'])}, completion lens "
              f"{[len(c) for c in r['completion_ids']]}")
    summarize("em", em)
    fd_check("em", lambda sc: em_loss(sc, em_records)[0], em[torch.float64]["grads"])

    # ---- empo ----
    write_jsonl(os.path.join(OUT_DIR, "empo_rollouts.jsonl"), EMPO_RECORDS)
    tokenized = tokenize_empo(tok, EMPO_RECORDS)
    stats = [empo_group_stats(r["completions"]) for r in EMPO_RECORDS]
    for st, exp in zip(stats, EXPECTED_ANSWERS):
        assert st["answers"] == exp, (st["answers"], exp)
    assert [st["keep"] for st in stats] == [True, True, False]
    kept = [i for i, st in enumerate(stats) if st["keep"]]

    print("empo groups:")
    for i, (st, rec) in enumerate(zip(stats, tokenized)):
        print(f"  record {i}: answers {st['answers']} clusters {st['counts']} SE {st['se']!r} "
              f"keep {st['keep']}")
        print(f"    prompt len {len(rec['prompt_ids'])}, completion lens "
              f"{[len(c) for c in rec['completion_ids']]}")
        print(f"    rewards    {st['rewards']}")
        print(f"    advantages {[repr(a) for a in st['adv']]}")

    for case, agg in (("empo_token_mean", "token-mean"), ("empo_seq_mean_token_mean", "seq-mean-token-mean")):
        res = run_empo(tokenized, stats, agg)
        check_names(res[torch.float32]["new"])
        meta = base_meta(EMPO_TEMP, res)
        meta.update({
            "loss_agg_mode": agg,
            "rollouts": "empo_rollouts.jsonl",
            "clip_eps": repr(CLIP_EPS),
            "adv_eps": repr(ADV_EPS),
            "entropy_min": repr(ENTROPY_MIN),
            "entropy_max": repr(ENTROPY_MAX),
            "group_size": str(len(EMPO_RECORDS[0]["completions"])),
            "num_sequences": str(res[torch.float32]["nseq"]),
            "kept_records": jdump(kept),
            "answers": jdump([st["answers"] for st in stats]),
            "rewards": jdump([st["rewards"] for st in stats]),
            "advantages": jdump([st["adv"] for st in stats]),
            "semantic_entropies": jdump([st["se"] for st in stats]),
            "token_ids": jdump(tokenized),
        })
        save_safetensors(os.path.join(OUT_DIR, f"{case}.expected.safetensors"), res[torch.float32]["new"], meta)
        summarize(case, res)
        old_lp = empo_old_logprobs(F64Scorer(), tokenized, stats)
        fd_check(
            case,
            lambda sc: empo_aggregate(empo_token_losses(sc, tokenized, stats, torch.float64, old_lp), agg)[0],
            res[torch.float64]["grads"],
        )

    total = 0
    print("files:")
    for fn in sorted(os.listdir(OUT_DIR)):
        sz = os.path.getsize(os.path.join(OUT_DIR, fn))
        total += sz
        print(f"  {fn}: {sz} bytes")
    print(f"  total: {total} bytes")
    assert total < 1_600_000, total


if __name__ == "__main__":
    sys.exit(main())
