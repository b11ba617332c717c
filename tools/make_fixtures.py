#!/usr/bin/env python3
"""Deterministically (re)create the test fixtures under tests/fixtures/.

Run from the repository root:

    python3 tools/make_fixtures.py

Creates:
  tests/fixtures/tiny-qwen2-a/                 tied, f32, single model.safetensors,
                                               top-level rope_theta, torch_dtype
  tests/fixtures/tiny-qwen2-b/                 untied, bf16, sharded + index json,
                                               rope_parameters, dtype
  tests/fixtures/tiny-qwen2-{a,b}.reference.safetensors
                                               logits / logprobs / entropy / loss /
                                               grads / greedy generation reference
  tests/fixtures/tokenizer_reference.json      encode/decode + chat template reference

Everything is computed on the CPU with fixed seeds. Reference values are produced
by transformers' Qwen2ForCausalLM (eager attention) in float32, using the weights
exactly as stored on disk (model b: bf16 values upcast to f32).
"""

import json
import math
import os
import shutil
import struct
import sys
import time
import unicodedata

T_START = time.time()

import torch  # noqa: E402

torch.set_num_threads(1)  # determinism + the build machine is small
torch.use_deterministic_algorithms(True)

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")

TEMP = 0.7
ENT_COEF = 0.5
BATCH = 2
SEQ = 12
PROMPT_LEN = 6
GEN_TOKENS = 20
MIN_TOP2_GAP = 1e-3
MIN_DISTINCT_GEN = 8  # distinct ids among the generated tokens

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB_WITHOUT_SPECIALS = 397  # + 3 special tokens = 400

# GPT-style pre-tokenization as used by Qwen2: contractions, letter runs (optionally
# preceded by one non-letter/non-digit char), single digits, punctuation runs,
# newlines, whitespace. Together with the NFC normalizer this is exactly the pipeline
# that transformers 5.x's Qwen2Tokenizer rebuilds from vocab/merges (AutoTokenizer
# forces that class for model_type "qwen2" regardless of tokenizer_class), so the
# shipped tokenizer.json and AutoTokenizer agree; make_tokenizer_reference() checks it.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

TRAINING_TEXT = r"""
The small engine reads a model from disk, runs it forward, and learns from the
rewards it is given. Each step samples a few answers, scores them, and moves the
weights a little. It's slow at first, but we'll make it faster; they've said the
kernels are the hard part and I'm inclined to agree.

Solve the problem and put the final answer in a box. If Tom has 3 apples and buys
4 more, he has 3 + 4 = 7 apples. The answer is \boxed{7}.
What is 12 * 12? We compute 12 * 12 = 144, so the answer is \boxed{144}.
If x + 5 = 17, then x = 17 - 5 = 12. The answer is \boxed{12}.
Compute 2^10. Since 2^5 = 32, we get 2^10 = 32 * 32 = 1024. The answer is \boxed{1024}.
The sum of the first 10 positive integers is 10 * 11 / 2 = 55, so \boxed{55}.
A train travels 60 miles per hour for 2.5 hours: 60 * 2.5 = 150 miles. \boxed{150}
Let f(x) = x^2 + 3x + 2. Then f(1) = 1 + 3 + 2 = 6 and f(0) = 2. \boxed{6}

In the beginning the assistant thinks step by step. First, it reads the question.
Then it writes the reasoning, one line at a time, and finally the answer. The
answer should be short, exact, and easy to check. When the answer is a number,
the number goes inside \boxed{...} so that a simple program can find it.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 100 1000.
Digits repeated: 0123456789 9876543210 31415926535 27182818284 1618033988.
Operations: 3 + 4 = 7, 9 - 2 = 7, 6 * 7 = 42, 8 / 2 = 4, 5 + 5 = 10, 7 - 3 = 4.
Fractions: 1/2 + 1/4 = 3/4, and 2/3 * 3/4 = 1/2. Percent: 50% of 80 is 40.

The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins
with a single step. Where there is a will, there is a way. The best way to learn
is to practice, and the best way to practice is to solve many small problems.
Café, naïve, résumé: words with accents are still words.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
"""

# A ChatML template written for these fixtures. Content is stripped of surrounding
# whitespace; a default system message is inserted when none is given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message['role'] != 'system' %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

MODEL_SPECS = {
    "tiny-qwen2-a": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        storage_dtype=torch.float32,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_shard_size=None,  # single model.safetensors
        seed=1234,
    ),
    "tiny-qwen2-b": dict(
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        storage_dtype=torch.bfloat16,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        max_shard_size="300KB",  # ~667 KB of bf16 weights -> 3 shards
        seed=5678,
    ),
}

MAX_POSITION_EMBEDDINGS = 512


# --------------------------------------------------------------------------- utils


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_safetensors(path, tensors, metadata):
    """Minimal deterministic safetensors writer (sorted names, sorted metadata)."""
    dtype_names = {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}
    header = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:
            data = t.view(torch.int16).numpy().tobytes()
        else:
            data = t.numpy().tobytes()
        header[name] = {
            "dtype": dtype_names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def read_safetensors_dir(model_dir):
    """All tensors stored in a HF model dir (single file or sharded), as torch tensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        with safe_open(os.path.join(model_dir, fn), framework="pt") as f:
            for k in f.keys():
                assert k not in out, k
                out[k] = f.get_tensor(k)
    return out, files


def dir_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    return total


# ----------------------------------------------------------------------- tokenizer


def build_tokenizer():
    tok = Tokenizer(
        models.BPE(fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_WITHOUT_SPECIALS,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        # sorted: ByteLevel.alphabet() order varies between processes
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
    )
    # Repeat the text a few times so counts are comfortably above min_frequency.
    tok.train_from_iterator([TRAINING_TEXT] * 3, trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    assert base == BPE_VOCAB_WITHOUT_SPECIALS, f"BPE trained only {base} tokens"
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
         for t in SPECIAL_TOKENS]
    )
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids == {t: base + i for i, t in enumerate(SPECIAL_TOKENS)}, ids
    return tok, ids


def tokenizer_files(tok, special_ids):
    """Return {filename: bytes} for the tokenizer files shared by both models."""
    tok_json = json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"
    added_tokens_decoder = {
        str(special_ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    gen_config = {
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
    }
    enc = lambda o: (json.dumps(o, indent=2, ensure_ascii=False) + "\n").encode("utf-8")  # noqa: E731
    return {
        "tokenizer.json": tok_json.encode("utf-8"),
        "tokenizer_config.json": enc(tok_config),
        "generation_config.json": enc(gen_config),
    }


# -------------------------------------------------------------------------- models


def model_vocab_size(tok_vocab):
    v = ((tok_vocab + 63) // 64) * 64
    if v - tok_vocab < 16:  # always leave some padding rows
        v += 64
    return v


def make_config_dict(spec, vocab_size, special_ids):
    d = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": spec["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": spec["intermediate_size"],
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "max_window_layers": spec["num_hidden_layers"],
        "model_type": "qwen2",
        "num_attention_heads": spec["num_attention_heads"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "rms_norm_eps": spec["rms_norm_eps"],
    }
    if spec["storage_dtype"] == torch.float32:
        # legacy (transformers 4.x) layout
        d["rope_scaling"] = None
        d["rope_theta"] = spec["rope_theta"]
        d["sliding_window"] = MAX_POSITION_EMBEDDINGS
        d["tie_word_embeddings"] = spec["tie_word_embeddings"]
        d["torch_dtype"] = "float32"
    else:
        # transformers 5.x layout
        d["dtype"] = "bfloat16"
        d["rope_parameters"] = {"rope_theta": spec["rope_theta"], "rope_type": "default"}
        d["sliding_window"] = None
        d["tie_word_embeddings"] = spec["tie_word_embeddings"]
    d["use_cache"] = True
    d["use_sliding_window"] = False
    d["vocab_size"] = vocab_size
    return d


@torch.no_grad()
def init_weights(model, spec, tok_vocab, seed):
    g = torch.Generator().manual_seed(seed)

    def normal_(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)

    for name, p in model.named_parameters():  # tied lm_head is not listed separately
        if name.endswith("norm.weight"):
            normal_(p, 0.1, 1.0)
        elif name.endswith(".bias"):
            normal_(p, 0.05)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            normal_(p, 0.12)
            # padding rows (ids the tokenizer never produces): small, like untrained rows
            p[tok_vocab:] *= 0.1
        else:
            normal_(p, 0.1)


def build_and_save_model(name, spec, tok_vocab, special_ids, tok_files):
    out_dir = os.path.join(FIXTURES, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    vocab_size = model_vocab_size(tok_vocab)
    cfg_dict = make_config_dict(spec, vocab_size, special_ids)

    torch.manual_seed(spec["seed"])
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=spec["rms_norm_eps"],
        rope_parameters={"rope_theta": spec["rope_theta"], "rope_type": "default"},
        tie_word_embeddings=spec["tie_word_embeddings"],
        use_sliding_window=False,
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
    )
    model = Qwen2ForCausalLM(config).float()
    init_weights(model, spec, tok_vocab, spec["seed"])
    model = model.to(spec["storage_dtype"])

    save_kwargs = {}
    if spec["max_shard_size"] is not None:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(out_dir, **save_kwargs)

    # Replace everything that is not weights with files we control.
    for fn in os.listdir(out_dir):
        if not (fn.endswith(".safetensors") or fn == "model.safetensors.index.json"):
            os.remove(os.path.join(out_dir, fn))
    write_json(os.path.join(out_dir, "config.json"), cfg_dict)
    for fn, data in tok_files.items():
        with open(os.path.join(out_dir, fn), "wb") as f:
            f.write(data)

    # Layout checks.
    stored, files = read_safetensors_dir(out_dir)
    if spec["max_shard_size"] is None:
        assert files == ["model.safetensors"], files
    else:
        assert len(files) >= 2 and all(f.startswith("model-0000") for f in files), files
    assert ("lm_head.weight" in stored) == (not spec["tie_word_embeddings"])
    assert all(t.dtype == spec["storage_dtype"] for t in stored.values())
    return out_dir, stored, files


def load_f32(out_dir, spec):
    if spec["storage_dtype"] == torch.float32:
        m = Qwen2ForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    else:
        m = Qwen2ForCausalLM.from_pretrained(out_dir, dtype=spec["storage_dtype"], attn_implementation="eager")
        m = m.float()
    m.eval()
    return m


def check_loaded(model, spec, stored, vocab_size):
    cfg = model.config
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == spec["rope_theta"], (theta, spec["rope_theta"])
    assert cfg.tie_word_embeddings == spec["tie_word_embeddings"]
    assert cfg.vocab_size == vocab_size
    assert model.model.embed_tokens.padding_idx is None, "padding_idx would zero an embedding grad row"
    assert getattr(cfg, "sliding_window", None) is None or not cfg.use_sliding_window
    assert all(lt == "full_attention" for lt in cfg.layer_types), cfg.layer_types
    if spec["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    params = dict(model.named_parameters())
    assert set(params) == set(stored), (sorted(set(params) ^ set(stored)))
    for k, t in stored.items():
        assert torch.equal(params[k].detach(), t.float()), k


def loss_terms(logits, input_ids):
    scaled = logits / TEMP
    logp = torch.log_softmax(scaled, dim=-1)
    logprobs = logp[:, :-1, :].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss = -logprobs.mean() + ENT_COEF * entropy.mean()
    return logprobs, entropy, loss


def greedy(model, prompt):
    ids = prompt.clone()[None, :]
    gaps = []
    with torch.no_grad():
        for _ in range(GEN_TOKENS):
            last = model(input_ids=ids).logits[0, -1]
            top2 = torch.topk(last, 2)
            gaps.append((top2.values[0] - top2.values[1]).item())
            ids = torch.cat([ids, top2.indices[:1][None, :]], dim=1)
    return ids[0, prompt.numel():], min(gaps)


def make_reference(name, spec, out_dir, stored, tok_vocab, vocab_size):
    model = load_f32(out_dir, spec)
    check_loaded(model, spec, stored, vocab_size)

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    input_ids = torch.randint(0, tok_vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    assert logits.dtype == torch.float32 and logits.shape == (BATCH, SEQ, vocab_size)
    logprobs, entropy, loss = loss_terms(logits, input_ids)
    loss.backward()

    tensors = {
        "input_ids": input_ids,
        "logits": logits.detach(),
        "logprobs": logprobs.detach(),
        "entropy": entropy.detach(),
        "loss": loss.detach().reshape(()),
    }
    params = dict(model.named_parameters())
    for k in stored:
        assert params[k].grad is not None, k
        tensors["grad." + k] = params[k].grad.detach().clone()

    # float64 cross-check of the same function (same stored weights).
    m64 = load_f32(out_dir, spec).double()
    logits64 = m64(input_ids=input_ids).logits
    lp64, ent64, loss64 = loss_terms(logits64, input_ids)
    loss64.backward()
    p64 = dict(m64.named_parameters())
    max_rel_grad = max(
        ((p64[k].grad - params[k].grad.double()).abs().max() / p64[k].grad.abs().max().clamp_min(1e-30)).item()
        for k in stored
    )
    f64_check = {
        "logits_max_abs": (logits64 - logits.double()).abs().max().item(),
        "loss_abs": abs(loss64.item() - loss.item()),
        "grad_max_rel": max_rel_grad,
    }

    # Greedy generation: find a prompt where no step is a near-tie, every produced
    # id is a real tokenizer id, and the continuation is not a trivial repeat loop.
    for attempt in range(1000):
        prompt = torch.randint(0, tok_vocab, (PROMPT_LEN,), generator=g, dtype=torch.int64)
        gen, gap = greedy(model, prompt)
        if gap > MIN_TOP2_GAP and int(gen.max()) < tok_vocab and len(set(gen.tolist())) >= MIN_DISTINCT_GEN:
            break
    else:
        raise RuntimeError("no suitable greedy prompt found")
    assert gen.numel() == GEN_TOKENS
    tensors["gen_prompt_ids"] = prompt
    tensors["gen_greedy_ids"] = gen

    metadata = {
        "temperature": repr(TEMP),
        "entropy_coef": repr(ENT_COEF),
        "model_dir": name,
        "min_top2_gap": f"{gap:.6g}",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    ref_path = os.path.join(FIXTURES, f"{name}.reference.safetensors")
    write_safetensors(ref_path, tensors, metadata)

    # Read back with the safetensors library to validate the writer.
    with safe_open(ref_path, framework="pt") as f:
        assert f.metadata()["temperature"] == "0.7"
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k

    stats = {
        "loss": loss.item(),
        "mean_entropy": entropy.mean().item(),
        "uniform_entropy": math.log(vocab_size),
        "logits_std": logits.std().item(),
        "min_top2_gap": gap,
        "greedy_attempts": attempt + 1,
        "f64": f64_check,
    }
    return ref_path, stats


# ---------------------------------------------------------- tokenizer reference


def make_tokenizer_reference(model_dir, special_ids):
    tok = AutoTokenizer.from_pretrained(model_dir)
    # The tokenizer.json as the Rust `tokenizers` crate would see it.
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    loaded = json.loads(tok.backend_tokenizer.to_str())
    shipped = json.loads(raw.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert loaded[key] == shipped[key], f"transformers uses a different tokenizer {key}"
    assert loaded["model"]["vocab"] == shipped["model"]["vocab"]
    assert loaded["model"]["merges"] == shipped["model"]["merges"]
    for t, i in special_ids.items():
        assert tok.convert_tokens_to_ids(t) == i, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None

    def encode_checked(text):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        return ids

    texts = [
        "Hello world",
        "The answer is \\boxed{3}.",
        "If x + 5 = 17, then x = 12.\nSo \\boxed{12}",
        "Café naïve résumé é",
        "decomposed e\u0301 (NFC turns it into \u00e9)",
        "  leading spaces,   multiple   spaces\n\n\tand a tab\n",
        "3 + 4 = 7 and 31415926535",
        "Done.<|im_end|>\n<|im_start|>assistant\nOK",
        "It's, we'll, they've, I'm",
        "emoji \U0001F600 and 中文",
    ]
    entries = []
    for text in texts:
        ids = encode_checked(text)
        decoded = tok.decode(ids)
        assert decoded == raw.decode(ids, skip_special_tokens=False), text
        assert decoded == unicodedata.normalize("NFC", text), (text, decoded)
        entries.append({"text": text, "ids": ids, "decoded": decoded})

    chats = [
        ([{"role": "user", "content": "  What is 2+3?  "}], True),
        ([{"role": "system", "content": "You are a careful math tutor."},
          {"role": "user", "content": "  What is 2+3?  "}], True),
        ([{"role": "user", "content": "  What is 2+3?  "},
          {"role": "assistant", "content": "2+3 = 5, so \\boxed{5}.\n"}], False),
    ]
    chat_entries = []
    for messages, agp in chats:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        ids = encode_checked(rendered)
        chat_entries.append(
            {"messages": messages, "add_generation_prompt": agp, "chat_rendered": rendered, "ids": ids}
        )
    ref = {
        "tokenizer_dir": os.path.basename(model_dir),
        "vocab_size": len(tok),
        "special_tokens": special_ids,
        "texts": entries,
        "chat": chat_entries,
    }
    path = os.path.join(FIXTURES, "tokenizer_reference.json")
    write_json(path, ref)
    return path, ref


# ---------------------------------------------------------------------------- main


def main():
    os.makedirs(FIXTURES, exist_ok=True)
    transformers.logging.set_verbosity_error()

    tok, special_ids = build_tokenizer()
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    tok_files = tokenizer_files(tok, special_ids)

    summary = []
    for name, spec in MODEL_SPECS.items():
        out_dir, stored, files = build_and_save_model(name, spec, tok_vocab, special_ids, tok_files)
        vocab_size = model_vocab_size(tok_vocab)
        ref_path, stats = make_reference(name, spec, out_dir, stored, tok_vocab, vocab_size)
        summary.append((name, out_dir, files, ref_path, vocab_size, stats))

    tok_ref_path, tok_ref = make_tokenizer_reference(os.path.join(FIXTURES, "tiny-qwen2-a"), special_ids)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"tokenizer vocab: {tok_vocab} (BPE {tok_vocab - len(SPECIAL_TOKENS)} + specials {special_ids})")
    for name, out_dir, files, ref_path, vocab_size, st in summary:
        print(
            f"{name}: model vocab {vocab_size}, dir {dir_size(out_dir)} B, weight files {files}, "
            f"reference {os.path.getsize(ref_path)} B"
        )
        print(
            f"  loss {st['loss']:.6f}, mean entropy {st['mean_entropy']:.4f} (uniform {st['uniform_entropy']:.4f}), "
            f"logits std {st['logits_std']:.4f}, min top-2 gap {st['min_top2_gap']:.4g} "
            f"(prompt attempt {st['greedy_attempts']})"
        )
        f64 = st["f64"]
        print(
            f"  f32 vs f64: logits max abs {f64['logits_max_abs']:.3g}, loss abs {f64['loss_abs']:.3g}, "
            f"grad max rel {f64['grad_max_rel']:.3g}"
        )
    print(f"tokenizer_reference.json: {os.path.getsize(tok_ref_path)} B, {len(tok_ref['texts'])} texts, "
          f"{len(tok_ref['chat'])} chats")
    print(f"tests/fixtures total: {dir_size(FIXTURES)} B; took {time.time() - T_START:.1f}s")


if __name__ == "__main__":
    main()
