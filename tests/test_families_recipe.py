"""The whole recipe on users' checkpoints: a Qwen3-layout model with its own Hugging Face tokenizer
(chat template, <|im_end|> as EOS, <think> as an added token) goes through sft -> rl -> distill into
a Llama-layout student of the same tokenizer (sequence level and logit level) -> eval -> chat, each
stage on our own model (not the transformers wrapper), ledgered, exporting the family's own layout;
sequence-level distillation into a student with a different tokenizer works, logit-level refuses it."""
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from sputnik.cli import main
from sputnik.config import build
from sputnik.model.llama import LlamaModel
from sputnik.stages import distill, rl, sft
from sputnik.train.loading import load_model, load_tokenizer

QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_tokenizer(directory, vocab=320, seed=0, extra=()):
    """A byte-level BPE trained here, wrapped as a transformers fast tokenizer with a Qwen-style chat template."""
    from sputnik.tasks import corpus_text
    from sputnik.tokenizer import new_backend
    from tokenizers import trainers

    rng = random.Random(seed)
    docs = [f"{a} plus {b} is {a + b}." for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(300))]
    backend = new_backend()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
    backend.train_from_iterator(list(extra) + docs + corpus_text(["addition"], 300, seed=seed + 1),
                                trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_TEMPLATE)
    tok.save_pretrained(directory)
    return tok


def save_model(config, directory, tok):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    root = tmp_path_factory.mktemp("users")
    tok = hf_tokenizer(root / "tok")
    V = len(tok)
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    teacher = save_model(Qwen3Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=32, intermediate_size=128,
                                     max_position_embeddings=256, tie_word_embeddings=True, **ids), root / "qwen3", tok)
    student = save_model(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=256, **ids), root / "llama", tok)
    return root, teacher, student


def test_tokenizer_is_the_checkpoints_own(users):
    _, teacher, _ = users
    tok = load_tokenizer("", str(teacher))
    prompt = tok.decode(tok.render_prompt("What is 2+3?"))
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eot_id == tok.token_to_id("<|im_end|>") and tok.think_id == tok.token_to_id("<think>")


@pytest.fixture
def lenient_addition(monkeypatch):
    """A random-init teacher is never right: let every answer verify, so traces exist to distil."""
    from sputnik.tasks.arithmetic import Addition
    from sputnik.tasks.base import Verdict

    monkeypatch.setattr(Addition, "verify", lambda self, ex, text: Verdict(True, False, text[:8], "test: every answer verifies"))


def test_recipe_end_to_end(users, tmp_path, capsys, monkeypatch, lenient_addition):
    root, teacher, student = users
    common = dict(num_threads=1, project_dir=str(tmp_path))
    s = sft.run(build(sft.Config, dict(out_dir=str(tmp_path / "sft"), init=str(teacher), tasks=["addition"],
                                       num_examples=32, eval_examples=4, max_new_tokens=12, batch_size=4, steps=3,
                                       eval_every=0, eval_batches=1, progress=False, **common)))
    assert json.loads((tmp_path / "sft" / "model" / "config.json").read_text())["model_type"] == "qwen3"
    assert isinstance(load_model(s["model_dir"]), LlamaModel)  # our own model, not the wrapper
    r = rl.run(build(rl.Config, dict(out_dir=str(tmp_path / "rl"), init=s["model_dir"], tasks=["addition"], steps=2,
                                     prompts_per_step=2, group_size=2, max_new_tokens=8, eval_every=0,
                                     eval_examples=4, dynamic_sampling=False, **common)))
    assert AutoModelForCausalLM.from_pretrained(r["model_dir"]).config.model_type == "qwen3"
    # a Qwen3 teacher distils into a Llama student of the same tokenizer: traces + SFT, and logit KD
    for mode in ("sequence", "logit"):
        d = distill.run(build(distill.Config, dict(out_dir=str(tmp_path / f"distill_{mode}"), teacher=r["model_dir"],
                                                   init=str(student), mode=mode, tasks=["addition"], num_prompts=4,
                                                   samples_per_prompt=2, max_new_tokens=8, teacher_temperature=1.0,
                                                   steps=2, batch_size=2, eval_examples=4, progress=False, **common)))
        out = json.loads((Path(d["student_dir"]) / "config.json").read_text())
        assert out["model_type"] == "llama" and d["num_traces"] > 0
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    done = {r["run_id"] for r in ledger if r["event"] == "finished"}
    finished = {r["command"] for r in ledger if r["event"] == "started" and r["run_id"] in done}
    assert {"sft", "rl", "distill", "distill-sft", "distill-kd", "distill-eval"} <= finished
    # eval and chat on the exported model
    capsys.readouterr()
    assert main(["eval", "--model", r["model_dir"], "--task", "addition", "--num_problems", "3",
                 "--max_new_tokens", "6", "--num_threads", "1", "--out", str(tmp_path / "eval"),
                 "--project_dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["problems"] == 3
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+3?\n"))
    assert main(["chat", "--model", r["model_dir"], "--temperature", "0", "--max_tokens", "5",
                 "--num_threads", "1"]) == 0


def test_sequence_distill_across_tokenizers_and_logit_kd_refuses(users, tmp_path, lenient_addition):
    root, teacher, _ = users
    other = hf_tokenizer(tmp_path / "other_tok", vocab=400, seed=7,
                         extra=["a quick brown fox jumps over the lazy dog; " * 3] * 50)
    assert len(other) != len(load_tokenizer("", str(teacher)).hf)
    student = save_model(LlamaConfig(vocab_size=len(other), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=256,
                                     eos_token_id=other.eos_token_id, pad_token_id=other.pad_token_id),
                         tmp_path / "other_student", other)
    base = dict(teacher=str(teacher), init=str(student), tasks=["addition"], num_prompts=4, samples_per_prompt=2,
                max_new_tokens=8, teacher_temperature=1.0, steps=2, batch_size=2, eval_examples=4, progress=False,
                num_threads=1, project_dir=str(tmp_path))
    d = distill.run(build(distill.Config, dict(base, out_dir=str(tmp_path / "seq"))))
    assert load_tokenizer("", d["student_dir"]).vocab_size == len(other)
    with pytest.raises(ValueError, match="logit-level KD needs a shared vocabulary"):
        distill.run(build(distill.Config, dict(base, out_dir=str(tmp_path / "kd"), mode="logit")))


def test_rl_with_the_tokenizer_in_another_directory(users, tmp_path):
    """A checkpoint directory without tokenizer files (the tokenizer lives elsewhere): --tokenizer."""
    import shutil

    root, teacher, _ = users
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher / name, bare / name)
    cfg = dict(out_dir=str(tmp_path / "rl"), init=str(bare), tasks=["addition"], steps=1, prompts_per_step=2,
               group_size=2, max_new_tokens=6, eval_every=0, eval_examples=2, dynamic_sampling=False, num_threads=1)
    with pytest.raises(ValueError, match="tokenizer"):
        rl.run(build(rl.Config, cfg))
    r = rl.run(build(rl.Config, dict(cfg, tokenizer=str(root / "tok"))))
    assert load_tokenizer("", r["model_dir"]).eot_id == load_tokenizer(str(root / "tok")).eot_id


def test_generation_config_eos_ids_stop_generation(users, tmp_path):
    """Llama 3 / Qwen chat checkpoints list several eos ids in generation_config.json: all of them stop."""
    import shutil

    root, _, _ = users
    shutil.copytree(root / "tok", tmp_path / "tok")
    hf = load_tokenizer(str(tmp_path / "tok")).hf
    pad = hf.pad_token_id
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.eos_token_id, pad, 10**9]}))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.stop_ids == (hf.eos_token_id, pad)  # the id outside the vocabulary is dropped
    assert load_tokenizer(str(root / "tok")).stop_ids == (hf.eos_token_id,)

    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams

    # greedy decoding ends at the first token generation_config lists, and the text leaves it out
    model = load_model(str(users[1])).eval()
    prompt = tok.render_prompt("What is 2+3?")
    free = Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0][0].token_ids
    stop = free[2]
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.eos_token_id, stop]}))
    tok = load_tokenizer(str(tmp_path / "tok"))
    out = Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=6, temperature=0,
                                                               stop_token_ids=tok.stop_ids))[0][0]
    first = free.index(stop)
    assert out.finish_reason == "stop" and out.token_ids == free[:first + 1]
    assert out.text == tok.decode(free[:first])


def test_qwen3_moe_checkpoint_through_sft_and_rl(users, tmp_path):
    """A real MoE of a user's (the Qwen3-MoE layout): SFT and GRPO on our own model, its expert load
    logged, exported as qwen3_moe with per-expert keys as on the hub."""
    from transformers import Qwen3MoeConfig

    root, _, _ = users
    tok = load_tokenizer(str(root / "tok")).hf
    moe = save_model(Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                    num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                    max_position_embeddings=256, tie_word_embeddings=True,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), tmp_path / "moe", tok)
    common = dict(num_threads=1, project_dir=str(tmp_path))
    s = sft.run(build(sft.Config, dict(out_dir=str(tmp_path / "sft"), init=str(moe), tasks=["addition"],
                                       num_examples=16, eval_examples=2, max_new_tokens=6, batch_size=4, steps=2,
                                       eval_every=0, eval_batches=1, log_every=1, progress=False, **common)))
    lines = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("moe_max_over_mean", 0) >= 1.0 for r in lines)  # the load of its 4 experts, logged
    r = rl.run(build(rl.Config, dict(out_dir=str(tmp_path / "rl"), init=s["model_dir"], tasks=["addition"], steps=1,
                                     prompts_per_step=2, group_size=2, max_new_tokens=6, eval_every=0,
                                     eval_examples=2, dynamic_sampling=False, **common)))
    cfg = json.loads((Path(r["model_dir"]) / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 4
    from safetensors import safe_open

    with safe_open(str(Path(r["model_dir"]) / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in set(f.keys())
    assert AutoModelForCausalLM.from_pretrained(r["model_dir"]).config.model_type == "qwen3_moe"
