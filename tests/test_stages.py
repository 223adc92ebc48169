"""The training stages end to end on tiny models: pretrain and sft run, resume bit for bit (also
after a real SIGKILL), skip non-finite steps and refuse bad input before writing anything
(sputnik/stages/pretrain.py, sft.py, sputnik/train/); the goal figures are test_stage_goals.py's."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sputnik.config import build
from sputnik.distributed import DistInfo
from sputnik.stages import pretrain, sft
from sputnik.tasks import parse_tasks
from sputnik.train import checkpoint as ck
from sputnik.train.evaluation import greedy_generate
from sputnik.train.loading import load_model, load_tokenizer
from sputnik.train.session import TrainingDiverged

ROOT = Path(__file__).resolve().parent.parent
TINY_MOE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=4, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=512)
TINY_DENSE = dict(architecture="llama", vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  num_attention_heads=2, num_nextn_predict_layers=0, max_position_embeddings=512)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Text documents and a 300-token BPE tokenizer fitted in-process (no network)."""
    from sputnik.tasks import corpus_text
    from sputnik.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ws")
    rng = random.Random(0)
    docs = [" ".join(f"{a} plus {b} is {a + b}." for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(8)))
            for _ in range(120)]
    (root / "texts").mkdir()
    for i, d in enumerate(docs):
        (root / "texts" / f"{i:03d}.txt").write_text(d)
    train_tokenizer(docs + corpus_text(["addition"], 300, seed=1), 300).save(root / "tok")
    return root


def pre_cfg(ws, out, **over):
    values = dict(out_dir=str(out), tokenizer=str(ws / "tok"), texts=[str(ws / "texts")], tasks=[], model=TINY_MOE,
                  seq_len=32, batch_size=4, steps=12, eval_every=4, eval_batches=2, checkpoint_every=4,
                  log_every=2, num_threads=1, progress=False, optim={"lr": 3e-3, "warmup_steps": 2})
    return build(pretrain.Config, {**values, **over})


def sft_cfg(out, init_dir, **over):
    values = dict(out_dir=str(out), init=str(init_dir), tasks=["addition"], num_examples=64,
                  eval_examples=8, max_new_tokens=24, batch_size=4, steps=6, eval_every=3, eval_batches=2,
                  checkpoint_every=3, log_every=1, num_threads=1, progress=False)
    return build(sft.Config, {**values, **over})


def greedy_heldout(model_dir, cfg) -> tuple[float, list[str]]:
    """(exact-match accuracy, completions) of greedy decoding of an exported model on the SFT stage's
    held-out problems, recomputed independently of the stage: the inference engine (KV cache), not
    the stage's greedy_generate over full forwards, and each task's own verifier."""
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
    from sputnik.tasks import heldout_examples

    model, tok = load_model(str(model_dir)).eval(), load_tokenizer("", str(model_dir))
    tasks = {t.name: t for t in parse_tasks(cfg.tasks)}
    examples = heldout_examples(list(tasks.values()), cfg.eval_examples, cfg.seed)
    outs = Engine(model, tok).generate([tok.render_prompt(ex.prompt) for ex in examples], SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=0, stop_token_ids=(tok.eot_id,)))
    texts = [o[0].text for o in outs]
    correct = [tasks[ex.task].verify(ex, text).correct for ex, text in zip(examples, texts)]
    return sum(correct) / len(examples), texts


def assert_stage_accuracy_is_recomputed(summary, out, cfg):
    """The stage's final accuracy equals the independent recomputation, and the completions it logged
    (samples.jsonl: its first held-out problems at the last evaluation) are the engine's greedy ones,
    so the check has teeth even where a tiny model scores 0."""
    acc, texts = greedy_heldout(Path(out) / "model", cfg)
    assert summary["accuracy"] == acc
    samples = [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]
    last = [r for r in samples if r["step"] == cfg.steps]
    assert len(last) == min(4, cfg.eval_examples)
    assert [r["completion"] for r in last] == texts[:len(last)]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def ckpt_tensors(path):
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def snapshot(directory):
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def pretrained(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    summary = pretrain.run(pre_cfg(ws, out, steps=16))
    return out, summary


# ---------------------------------------------------------------------------------------------
# Happy paths
def test_pretrain_loss_falls_and_writes_outputs(pretrained):
    out, summary = pretrained
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 5 and evals[-1] < evals[0] - 0.5  # steps 0, 4, 8, 12, 16
    train = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == list(range(2, 17, 2))
    assert all(m["mtp"] > 0 and m["moe_max_over_mean"] >= 1 and m["tokens_per_s"] > 0 for m in train)
    assert summary["final_eval_loss"] == pytest.approx(evals[-1])
    saved = json.loads((out / "stage_config.json").read_text())
    assert saved["config_class"] == "Config" and saved["model"]["hidden_size"] == 32
    for f in ("config.json", "model.safetensors", "tokenizer.json", "stage_config.json"):
        assert (out / "model" / f).is_file()
    ledger = [json.loads(line) for line in (out.parent / "ledger.jsonl").read_text().splitlines()]
    finished = [r for r in ledger if r["event"] == "finished" and r["status"] == "ok"]
    assert finished and finished[0]["tokens"] == 16 * 4 * 32 and finished[0]["flops"] > 0


def test_exported_model_reloads_with_same_eval_loss(pretrained, ws):
    out, summary = pretrained
    model = load_model(str(out / "model"))
    ref = load_model(str(ck.latest_checkpoint(out / "checkpoints")))
    x = torch.randint(0, 300, (2, 16))
    assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-5)


def test_sft_from_pretrained_model(pretrained, tmp_path):
    out, _ = pretrained
    cfg = sft_cfg(tmp_path / "sft", out / "model")
    summary = sft.run(cfg, parents=["pretrain-run"])
    evals = [m for m in metrics(tmp_path / "sft") if "accuracy" in m]
    assert [m["step"] for m in evals] == [0, 3, 6] and all(m["eval_n"] == 8 for m in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert summary["accuracy"] == evals[-1]["accuracy"]
    assert_stage_accuracy_is_recomputed(summary, tmp_path / "sft", cfg)
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [r["parents"] for r in ledger if r["event"] == "started"] == [["pretrain-run"]]  # explicit lineage
    assert summary["run_ids"] == [ledger[0]["run_id"]]
    sample = json.loads((tmp_path / "sft" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("What is") and "completion" in sample
    assert (tmp_path / "sft" / "model" / "tokenizer.json").is_file()  # tokenizer came from init


def test_pretrain_dense_llama(ws, tmp_path):
    summary = pretrain.run(pre_cfg(ws, tmp_path / "dense", model=TINY_DENSE, steps=8))
    evals = [m["eval_loss"] for m in metrics(tmp_path / "dense") if "eval_loss" in m]
    assert evals[-1] < evals[0] and summary["final_train_loss"] > 0
    assert all(m["mtp"] == 0 and m["moe_max_over_mean"] is None for m in metrics(tmp_path / "dense") if "loss" in m)
    model = load_model(str(tmp_path / "dense" / "model"))
    assert type(model).__name__ == "LlamaModel"


def test_cpu_kernels_off_takes_the_torch_path_with_the_same_results(ws, tmp_path, monkeypatch):
    """cpu_kernels=false (the config field that replaced SPUTNIK_NO_CPU_KERNELS) turns the C softmax
    kernel of the loss off for the run only: same losses up to rounding, the switch restored after."""
    from sputnik.kernels import cpu as kernels
    from sputnik.train import losses

    if not kernels.softmax_rows_available():
        pytest.skip("no C compiler for the CPU kernel")
    used, real = [], losses._softmax_kernel
    monkeypatch.setattr(losses, "_softmax_kernel", lambda h, dtype: used.append(real(h, dtype)) or used[-1])
    on = pretrain.run(pre_cfg(ws, tmp_path / "on", steps=4, eval_every=2))
    assert used and all(used)
    used.clear()
    off = pretrain.run(pre_cfg(ws, tmp_path / "off", steps=4, eval_every=2, cpu_kernels=False))
    assert used and not any(used)
    assert kernels.cpu_kernels_enabled()  # restored for the rest of the process
    assert off["final_train_loss"] == pytest.approx(on["final_train_loss"], rel=1e-4)
    assert off["final_eval_loss"] == pytest.approx(on["final_eval_loss"], rel=1e-4)


def test_foreign_hf_causal_lm_directory(ws, tmp_path):
    """Any local transformers causal LM (here a random GPT-2) pretrains and fine-tunes through
    the same loop, and the export is a transformers directory again."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from sputnik.tokenizer import Tokenizer

    torch.manual_seed(0)
    hf_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(hf_dir)
    Tokenizer.load(ws / "tok").save(hf_dir)
    with pytest.warns(UserWarning, match="model settings ignored"):  # pre_cfg passes TINY_MOE settings
        pretrain.run(pre_cfg(ws, tmp_path / "pre", init=str(hf_dir), tokenizer="", steps=8))
    evals = [m["eval_loss"] for m in metrics(tmp_path / "pre") if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.3
    cfg = sft_cfg(tmp_path / "sft", tmp_path / "pre" / "model", steps=3, eval_every=0)
    summary = sft.run(cfg)
    assert_stage_accuracy_is_recomputed(summary, tmp_path / "sft", cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert reloaded.config.model_type == "gpt2"


def test_sft_loss_only_on_assistant_tokens(pretrained):
    """The stage's batches carry targets exactly on the completion tokens and the closing eot."""
    from sputnik.tokenizer import Tokenizer

    cfg = sft_cfg(Path("unused"), pretrained[0] / "model")
    tok = Tokenizer.load(pretrained[0] / "model")
    train, held, examples = sft.load_data(cfg, tok, DistInfo())
    x_BT, y_BT = held[0]
    for row, ex in enumerate(examples[:len(x_BT)]):
        ids, mask = tok.render_chat(ex.prompt, f"<think>{ex.solution}</think><answer>{ex.answer}</answer>")
        assert int((y_BT[row] != -100).sum()) == sum(mask[1:])
        assert y_BT[row][y_BT[row] != -100].tolist() == [t for t, m in zip(ids[1:], mask[1:]) if m]
        assert y_BT[row][y_BT[row] != -100].tolist()[-1] == tok.eot_id


def test_sft_accuracy_counts_verified_greedy_completions(ws, tmp_path, monkeypatch):
    """sft.accuracy on known completions: 3 right answers of 6 problems -> 0.5 exactly, 4 well formatted
    -> format_rate 2/3, and the first four are logged with their verdicts (a stage that scored a tiny
    model 0 could not show the counting)."""
    from types import SimpleNamespace

    from sputnik.tasks import format_completion, heldout_examples
    from sputnik.tokenizer import Tokenizer

    tok = Tokenizer.load(ws / "tok")
    cfg = sft_cfg(tmp_path / "unused", tmp_path / "unused", eval_examples=6)
    examples = heldout_examples(parse_tasks(cfg.tasks), 6, cfg.seed)
    wrong = f"<think>guess</think><answer>{int(examples[1].answer) + 1}</answer>"
    texts = [format_completion(examples[0]), wrong, format_completion(examples[2]), format_completion(examples[3]),
             "7 7 7", ""]
    by_prompt = {tuple(tok.render_prompt(ex.prompt)): tok.encode(t) + [tok.eot_id] for ex, t in zip(examples, texts)}

    def fake_greedy(model, prompts, **kw):
        assert kw["stop_ids"] == {tok.eot_id} and kw["max_new_tokens"] == cfg.max_new_tokens
        return [by_prompt[tuple(p)] for p in prompts]

    monkeypatch.setattr(sft, "greedy_generate", fake_greedy)
    s = SimpleNamespace(dist=DistInfo(), tokenizer=tok, raw=SimpleNamespace(config=SimpleNamespace()), model=None,
                        device=torch.device("cpu"), amp=None, rank0=True, out=tmp_path)
    assert sft.accuracy(s, cfg, examples, step=7) == {"accuracy": 0.5, "format_rate": 4 / 6, "eval_n": 6,
                                                      "heldout_by_task": {"addition": {"accuracy": 0.5, "n": 6}}}
    logged = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"], r["correct"]) for r in logged] == [
        (7, ex.prompt, ok) for ex, ok in zip(examples[:4], (True, False, True, True))]


def test_sft_rl_and_distill_report_accuracy_on_the_same_problems(pretrained):
    """The report card compares the stages' held-out accuracies: SFT's evaluation set and the problems
    greedy_eval (RL's held-out, the distillation report) decodes are one set for the same tasks
    and seed (they once differed, and the same model scored 0.85 in SFT and 0.91 at RL's step 0)."""
    from sputnik.evaluate import greedy_eval
    from sputnik.tasks import heldout_examples
    from sputnik.tokenizer import Tokenizer

    cfg = sft_cfg(Path("unused"), pretrained[0] / "model", tasks=["addition", "subtraction", "multiplication"])
    tok = Tokenizer.load(pretrained[0] / "model")
    _, _, sft_examples = sft.load_data(cfg, tok, DistInfo())
    tasks = parse_tasks(cfg.tasks)
    assert [e.prompt for e in sft_examples] == [e.prompt for e in heldout_examples(tasks, cfg.eval_examples, cfg.seed)]

    class Recorder:  # an engine that records what it was asked to decode
        last_stats = type("S", (), {"tokens_per_second": 0.0})()

        def generate(self, prompts, params):
            self.prompts = prompts
            return [[type("C", (), {"text": ""})()] for _ in prompts]

    engine = Recorder()
    greedy_eval(engine, tok, tasks, cfg.eval_examples, cfg.seed, 8)
    assert engine.prompts == [tok.render_prompt(e.prompt) for e in sft_examples]


def test_greedy_generate_ragged_batch_equals_one_by_one():
    from sputnik.model import build_model
    from sputnik.model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(build(ModelConfig, TINY_MOE))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    kw = dict(max_new_tokens=6, stop_ids={1}, pad_id=0, device=torch.device("cpu"))
    batched = greedy_generate(model, prompts, batch_size=3, **kw)
    single = [greedy_generate(model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single and all(len(o) == 6 for o in batched)
    x = torch.tensor([prompts[1]])  # and equals a step-by-step argmax of the full forward
    for _ in range(6):
        x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert batched[1] == x[0, 6:].tolist()
    assert greedy_generate(model, prompts[:1], max_new_tokens=6, stop_ids={batched[0][1]}, pad_id=0,
                              device=torch.device("cpu")) == [batched[0][:2]]  # stops after the stop token


def test_cli_exit_codes(ws, tmp_path, capsys):
    from sputnik.cli import main

    model = [a for k, v in TINY_MOE.items() for a in (f"--model.{k}", str(v))]
    base = ["pretrain", "--tokenizer", str(ws / "tok"), "--texts", str(ws / "texts"), "--tasks=", "--seq_len", "32",
            "--batch_size", "4", "--steps", "3", "--num_threads", "1", "--progress", "false", *model]
    assert main([*base, "--out_dir", str(tmp_path / "ok")]) == 0
    assert main([*base, "--out_dir", str(tmp_path / "bad"), "--model.vocab_size", "64"]) == 2
    assert "exceeds the model's vocab_size 64" in capsys.readouterr().err
    assert main([*base, "--out_dir", str(tmp_path / "nan"), "--poison_steps", "0,1", "--max_nonfinite_steps", "2"]) == 3
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# Resume
def test_resume_is_bit_identical(ws, tmp_path):
    full = tmp_path / "full"
    pretrain.run(pre_cfg(ws, full, keep_last=5))
    part = tmp_path / "part"
    part.mkdir()
    os.system(f"cp -r {full}/checkpoints {full}/metrics.jsonl {part}/")
    for step in (8, 12):  # as if the run had died right after the checkpoint at step 4
        os.system(f"rm -rf {part}/checkpoints/ckpt-0000{step:02d}")
    pretrain.run(pre_cfg(ws, part, keep_last=5, resume="auto", log_every=1))  # logging knobs may change
    assert_same_tensors(ckpt_tensors(full / "checkpoints" / "ckpt-000012"), ckpt_tensors(part / "checkpoints" / "ckpt-000012"))
    opt_a = torch.load(full / "checkpoints" / "ckpt-000012" / "optimizer.pt")
    opt_b = torch.load(part / "checkpoints" / "ckpt-000012" / "optimizer.pt")
    for pid, s in opt_a["state"].items():
        assert all(torch.equal(s[k], opt_b["state"][pid][k]) for k in s)
    losses = lambda d, lo: {m["step"]: m["loss"] for m in metrics(d) if "loss" in m and m["step"] > lo}
    assert losses(full, 4) == {k: v for k, v in losses(part, 4).items() if k % 2 == 0}
    assert min(m["step"] for m in metrics(part) if "loss" in m and m["step"] > 4) == 5  # lines after step 4 trimmed
    # counters ride in the checkpoint: the resumed run's token and FLOP totals continue, never restart
    last = lambda d: [m for m in metrics(d) if "loss" in m][-1]  # noqa: E731
    assert last(part)["tokens"] == last(full)["tokens"] == 12 * 4 * 32
    assert last(part)["flops"] == pytest.approx(last(full)["flops"])
    # the resumed run names the run that wrote its checkpoint as a parent (the lineage keeps both)
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    started = [r for r in ledger if r["event"] == "started"]
    assert started[-1]["parents"] == [started[0]["run_id"]]


def test_sft_resume_keeps_counting_tokens(pretrained, tmp_path):
    """SFT's token and FLOP counters continue across a resume (they once restarted at 0)."""
    out = pretrained[0]
    full = sft.run(sft_cfg(tmp_path / "full", out / "model", eval_every=0, keep_last=5))
    part = tmp_path / "part"
    part.mkdir()
    os.system(f"cp -r {tmp_path / 'full'}/checkpoints {tmp_path / 'full'}/metrics.jsonl {part}/")
    os.system(f"rm -rf {part}/checkpoints/ckpt-000006")
    resumed = sft.run(sft_cfg(part, out / "model", eval_every=0, keep_last=5, resume="auto"))
    assert resumed["tokens"] == full["tokens"] > 0
    assert_same_tensors(ckpt_tensors(tmp_path / "full" / "checkpoints" / "ckpt-000006"),
                        ckpt_tensors(part / "checkpoints" / "ckpt-000006"))
    # per step, the resumed metrics carry the uninterrupted run's cumulative counts (not counts since resume)
    counts = lambda d: {m["step"]: (m["tokens"], m["flops"]) for m in metrics(d) if "loss" in m}  # noqa: E731
    assert counts(part) == counts(tmp_path / "full") and counts(part)[6][0] == full["tokens"]
    # the ledger counts each run's own tokens: the resumed run only steps 4-6, and it names as parent the
    # run that wrote the checkpoint it continued from
    ledger = {r["run_id"]: r for r in (json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines())
              if r["event"] == "finished"}
    first, again = ledger[full["run_ids"][0]], ledger[resumed["run_ids"][0]]
    assert first["tokens"] == full["tokens"] and again["tokens"] == full["tokens"] - counts(part)[3][0] > 0
    assert again["parents"] == full["run_ids"]


def sigkill_after_checkpoint(cmd, env, checkpoints_dir, name, timeout=120) -> None:
    """Run `cmd` and SIGKILL it as soon as checkpoint `name` (or a later one) exists in checkpoints_dir;
    asserts it really died by the signal."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        latest = ck.latest_checkpoint(checkpoints_dir)
        if latest is not None and latest.name >= name:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]


def test_sigkill_mid_training_then_resume_matches_uninterrupted(ws, tmp_path):
    """Slower (~15-25 s): a real `python -m` process SIGKILLed mid-run, resumed in another."""
    steps = 60
    ref = tmp_path / "ref"
    pretrain.run(pre_cfg(ws, ref, steps=steps, checkpoint_every=10, eval_every=30))
    out = tmp_path / "killed"
    model = [f"--model.{k} {v}" for k, v in TINY_MOE.items()]
    cmd = (f"{sys.executable} -m sputnik pretrain --out_dir {out} --tokenizer {ws / 'tok'} --texts {ws / 'texts'} "
           f"--tasks= --seq_len 32 --batch_size 4 --steps {steps} --eval_every 30 --eval_batches 2 "
           f"--checkpoint_every 10 --log_every 2 --num_threads 1 --progress false --optim.lr 3e-3 "
           f"--optim.warmup_steps 2 " + " ".join(model)).split()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sigkill_after_checkpoint(cmd, env, out / "checkpoints", "ckpt-000020")
    assert not (out / "model").exists()  # it really died mid-training
    killed_at = ck.latest_checkpoint(out / "checkpoints").name
    res = subprocess.run(cmd + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming at step {int(killed_at[5:])}" in res.stderr
    assert_same_tensors(ckpt_tensors(ref / "checkpoints" / f"ckpt-{steps:06d}"),
                        ckpt_tensors(out / "checkpoints" / f"ckpt-{steps:06d}"))
    assert_same_tensors(load_file(str(ref / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors")))


# ---------------------------------------------------------------------------------------------
# Non-finite guard
def test_nonfinite_step_is_skipped_without_a_trace(ws, tmp_path):
    out = tmp_path / "nan"
    summary = pretrain.run(pre_cfg(ws, out, steps=3, checkpoint_every=2, keep_last=5, poison_steps=[2], log_every=1))
    bad = [m for m in metrics(out) if m.get("nonfinite")]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["loss"] == "nan" and bad[0]["nonfinite_streak"] == 1
    assert summary["nonfinite_steps"] == 1
    # the poisoned third step changed nothing: weights, router biases and Adam moments as after step 2
    assert_same_tensors(ckpt_tensors(out / "checkpoints" / "ckpt-000002"), ckpt_tensors(out / "checkpoints" / "ckpt-000003"))
    opt = [torch.load(out / "checkpoints" / f"ckpt-00000{i}" / "optimizer.pt") for i in (2, 3)]
    assert all(torch.equal(v, opt[1]["state"][p][k]) for p, s in opt[0]["state"].items() for k, v in s.items())


def test_too_many_nonfinite_steps_stop_and_keep_last_good_checkpoint(ws, tmp_path):
    out = tmp_path / "diverge"
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        pretrain.run(pre_cfg(ws, out, steps=12, checkpoint_every=2, poison_steps=[4, 5, 6], max_nonfinite_steps=3))
    latest = ck.latest_checkpoint(out / "checkpoints")
    assert latest.name == "ckpt-000004"  # written before the poisoned steps; nothing after
    assert all(torch.isfinite(t).all() for t in ckpt_tensors(latest).values())
    assert not (out / "model").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError before any work, nothing written or overwritten
def test_tokenizer_larger_than_model_vocab(ws, tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's vocab_size 100"):
        pretrain.run(pre_cfg(ws, tmp_path / "o", model={**TINY_MOE, "vocab_size": 100}))
    assert not (tmp_path / "o").exists()


def test_empty_and_missing_data(ws, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        pretrain.run(pre_cfg(ws, tmp_path / "o", texts=[str(tmp_path / "empty.txt")]))
    with pytest.raises(ValueError, match="does not exist"):
        pretrain.run(pre_cfg(ws, tmp_path / "o", texts=[str(tmp_path / "missing.txt")]))
    with pytest.raises(ValueError, match="tokenizer file .* does not exist"):
        pretrain.run(pre_cfg(ws, tmp_path / "o", tokenizer=str(tmp_path / "no_tok")))
    with pytest.raises(ValueError, match="no pretraining data"):
        pre_cfg(ws, tmp_path / "o", texts=[])
    assert not (tmp_path / "o").exists()


def test_malformed_sft_jsonl_names_file_and_line(pretrained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "completion": "<think>1+1=2</think><answer>2</answer>"}\n{"prompt": 3\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        sft.run(sft_cfg(tmp_path / "o", pretrained[0] / "model", data=[str(bad)], tasks=[]))
    with pytest.raises(ValueError, match="neither a model directory"):
        sft.run(sft_cfg(tmp_path / "o", tmp_path / "nowhere", tokenizer=str(pretrained[0] / "model")))
    assert not (tmp_path / "o").exists()


def test_corrupt_or_incompatible_checkpoint_refused_and_nothing_overwritten(ws, pretrained, tmp_path):
    out = tmp_path / "run"
    os.system(f"cp -r {pretrained[0]} {out}")
    latest = ck.latest_checkpoint(out / "checkpoints")
    with pytest.raises(ValueError, match="wrong shape"):  # another model size
        pretrain.run(pre_cfg(ws, out, steps=16, resume="auto", model={**TINY_MOE, "hidden_size": 64}))
    with pytest.raises(ValueError, match="different config: steps"):
        pretrain.run(pre_cfg(ws, out, steps=20, resume="auto"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain.run(pre_cfg(ws, out, steps=16))
    f = latest / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = snapshot(out)
    with pytest.raises(ValueError, match="truncated"):
        pretrain.run(pre_cfg(ws, out, steps=16, resume="latest"))
    assert snapshot(out) == before


@pytest.mark.slow  # compiling the train and eval graphs takes ~30-60 s on 2 cores
def test_pretrain_with_torch_compile_matches_eager(ws, tmp_path):
    eager = pretrain.run(pre_cfg(ws, tmp_path / "eager", steps=4, eval_every=2))
    compiled = pretrain.run(pre_cfg(ws, tmp_path / "compiled", steps=4, eval_every=2, compile=True))
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-4)
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-4)
    a, b = ckpt_tensors(tmp_path / "eager" / "model"), ckpt_tensors(tmp_path / "compiled" / "model")
    assert a.keys() == b.keys()  # in-place compile leaves the exported state dict as it was
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
