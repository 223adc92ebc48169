"""What both sides of bench_grpo_step.py share: the task (prompts and reward) and the checkpoint they
load — a byte-level BPE tokenizer trained in-process and a random-init model, ours (a preset) or a
user's published layout (bench_families.SHAPES), written once into the benchmark's directory."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch


# ---------------------------------------------------------------------------------------------
# The task, shared by both sides
def make_prompts(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"prompt": f"What is {a}+{b}? Answer:", "answer": str(a + b)})
    return out


def addition_reward(completion: str, answer: str) -> float:
    """1 if the sum appears in the completion, plus 0.1 x the fraction of its characters that are digits."""
    hit = 1.0 if answer in completion else 0.0
    return hit + 0.1 * sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


# ---------------------------------------------------------------------------------------------
# Setup: tokenizer + random-init model, written once, loaded by both workers
def corpus_texts() -> list[str]:
    """Source and docs of this repository plus arithmetic sentences: enough text for a few thousand merges."""
    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text(errors="ignore") for pat in ("sputnik/**/*.py", "docs/**/*.md", "*.md")
             for p in sorted(root.glob(pat))]
    texts += [f"What is {e['prompt'][8:]} {e['answer']}." for e in make_prompts(5000, seed=1)]
    return texts


def build_tokenizer(vocab_size: int):
    import tokenizers

    from sputnik.tokenizer import Tokenizer, train_tokenizer

    tok = train_tokenizer(corpus_texts(), vocab_size)
    if tok.vocab_size < vocab_size:  # the corpus ran out of merges: fill the table with unused tokens
        backend = tok.backend
        backend.add_tokens([tokenizers.AddedToken(f"<|unused_{i}|>", special=False)
                            for i in range(vocab_size - tok.vocab_size)])
        tok = Tokenizer(backend, source="<trained+padded>")
    return tok


def model_config(name: str, vocab_size: int):
    from sputnik.model import config as mc

    return mc.PRESETS[name](vocab_size=vocab_size, num_nextn_predict_layers=0)


def setup_shape(workdir: Path, shape: str, layers: int, seed: int) -> dict:
    """A user's checkpoint: a random-init transformers model of a published layout (bench_families.SHAPES)
    at full width, `layers` deep, its vocabulary the in-process tokenizer padded to the published size."""
    from safetensors import safe_open

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_families import SHAPES, build_checkpoint  # noqa: E402

    family, values = SHAPES[shape]
    tok = build_tokenizer(values["vocab_size"])
    build_checkpoint(shape, layers, str(workdir / "model"), seed, vocab_size=tok.vocab_size, bos_token_id=tok.eot_id,
                     eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    tok.save(workdir / "model")
    with safe_open(str(workdir / "model" / "model.safetensors"), "pt") as f:  # a tied head is stored once
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return dict(vocab_size=tok.vocab_size, params_total=n, params_active=n, family=family,
                layers=layers or values["num_hidden_layers"])


def setup(workdir: Path, config: str, seed: int) -> dict:
    from sputnik.model import build_model
    from sputnik.model.config import PRESETS
    from sputnik.model.hf import save_hf

    target_vocab = PRESETS[config]().vocab_size
    tok = build_tokenizer(target_vocab)
    torch.manual_seed(seed)
    model = build_model(model_config(config, tok.vocab_size))
    save_hf(model, workdir / "model", tokenizer_ids=dict(pad_token_id=tok.pad_id, eos_token_id=tok.eot_id,
                                                          bos_token_id=tok.eot_id))
    tok.save(workdir / "model")
    return dict(vocab_size=tok.vocab_size, params_total=model.num_params(),
                params_active=model.num_params(active=True))
