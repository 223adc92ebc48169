"""`sputnik rl` end to end on a micro model: steps run, metrics and the ledger are written, a
resumed run continues from its checkpoint (its metrics trimmed), a prefilled template is refused,
and RL raises the reward of a barely fine-tuned policy (the learning goal, small)."""
import json
import math

import pytest
import torch

from sputnik.accounting import ledger
from sputnik.config import build
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.rl import prompts as rl_prompts
from sputnik.rl.health import HealthStop
from sputnik.stages import rl
from sputnik.tasks import corpus_text, format_completion, get_task
from sputnik.tokenizer import train_tokenizer
from sputnik.train.loading import save_model

MICRO = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
             moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=2,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             num_nextn_predict_layers=0, max_position_embeddings=256)


def make_policy(d):
    """An untrained micro policy (model + addition tokenizer) saved under d/model."""
    tok = train_tokenizer(corpus_text(["addition"], 300, seed=0), 320)
    save_model(build_model(tiny(**MICRO)), d / "model", tok, tiny(**MICRO))
    return d / "model"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_policy(tmp_path_factory.mktemp("policy"))


def _cfg(policy_dir, tmp_path, **kw):
    return build(rl.Config, {**dict(init=str(policy_dir), out_dir=str(tmp_path / "rl"), project_dir=str(tmp_path),
                                    tasks=["addition"], steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8,
                                    eval_every=0, eval_examples=4, checkpoint_every=1, num_threads=1,
                                    dynamic_sampling=False), **kw})


def test_rl_runs_writes_metrics_ledger_and_resumes(policy_dir, tmp_path):
    res = rl.run(_cfg(policy_dir, tmp_path))
    recs = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward_mean", "accuracy", "format_rate", "length_mean", "time_rollout", "time_update", "loss"):
        assert key in steps[0], key
    assert recs[0]["step"] == 0 and "heldout_accuracy" in recs[0]
    rows = [r for r in ledger.load(tmp_path) if r["command"] == "rl"]
    assert rows[-1]["status"] == "ok" and rows[-1]["flops"] > 0
    assert (tmp_path / "rl" / "model" / "config.json").is_file() and res["accuracy_curve"]
    assert res["run_ids"] == [rows[-1]["run_id"]] and res["model_dir"] == str(tmp_path / "rl" / "model")
    # the curve: held-out accuracy before RL (step 0) and at the last step, as the metrics lines say
    assert res["accuracy_curve"] == [(0, recs[0]["heldout_accuracy"]), (2, recs[-1]["heldout_accuracy"])]
    assert rows[-1]["metrics"]["heldout_accuracy"] == res["accuracy_after"] == recs[-1]["heldout_accuracy"]
    by_task = rows[-1]["metrics"]["heldout_by_task"]  # the same problems, split by task
    assert by_task == recs[-1]["heldout_by_task"] and sum(t["n"] for t in by_task.values()) == 4  # eval_examples
    assert sum(t["accuracy"] * t["n"] for t in by_task.values()) == pytest.approx(res["accuracy_after"] * sum(t["n"] for t in by_task.values()))
    # as if killed after step 1: the latest complete checkpoint is step 1; resume runs only step 2
    import shutil
    ck = tmp_path / "rl" / "checkpoints"
    shutil.rmtree(ck / "ckpt-000002")
    (ck / "latest").write_text("ckpt-000001\n")
    rl.run(_cfg(policy_dir, tmp_path, resume="auto"))
    resumed = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    # the lines of the repeated step 2 were trimmed on resume: one line per step, step 0 kept
    assert [r["step"] for r in resumed] == [0, 1, 2]
    # and step 2 is taken again exactly: same prompts, samples, rewards and update
    same = ("reward_mean", "accuracy", "format_rate", "length_mean", "sample", "loss", "grad_norm", "entropy")
    assert {k: resumed[-1][k] for k in same} == {k: recs[-1][k] for k in same}
    rows = [r for r in ledger.load(tmp_path) if r["command"] == "rl"]
    assert rows[-1]["parents"] == [rows[0]["run_id"]]  # the resumed run names the one that wrote its checkpoint


def test_rl_fresh_start_drops_the_metrics_of_an_earlier_run(policy_dir, tmp_path):
    metrics = tmp_path / "rl" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 0, "heldout_accuracy": 0.5}\n{"step": 7, "reward_mean": 9.0}\n{"step": 8, "rew')
    rl.run(_cfg(policy_dir, tmp_path, steps=1))
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == [0, 1]


@pytest.mark.slow  # compiles each block and the decode step: ~30-60 s on 2 cores
def test_rl_compiled_matches_eager_and_saves_plain_weights(weak_policy_dir, tmp_path, monkeypatch):
    """rl --compile (blocks compiled for the update, compiled decode step for the rollouts): the first
    step samples the same completions and takes the eager run's loss and gradient (non-zero: the weak
    policy's groups disagree); the saved model has the eager run's parameter names, loads into a
    plain model and holds the eager run's weights (up to Adam's first-step amplification of rounding)."""
    from sputnik.train import session
    from sputnik.train.loading import load_model

    kw = dict(steps=1, num_threads=2, prompts_per_step=2)  # 16 rows: few batch buckets to compile
    rl.run(_format_cfg(weak_policy_dir, tmp_path / "eager", **kw))
    compiled_blocks = []

    def compile_blocks(model, blocks):
        real_compile(model, blocks)
        compiled_blocks.extend(b for b in model.model.layers if b._compiled_call_impl is not None)

    real_compile = session._compile
    monkeypatch.setattr(session, "_compile", compile_blocks)
    rl.run(_format_cfg(weak_policy_dir, tmp_path / "compiled", **kw, compile=True))
    assert len(compiled_blocks) == MICRO["num_hidden_layers"]
    rec = [json.loads(l) for l in (tmp_path / "eager" / "rl" / "metrics.jsonl").read_text().splitlines()][-1]
    got = [json.loads(l) for l in (tmp_path / "compiled" / "rl" / "metrics.jsonl").read_text().splitlines()][-1]
    assert got["step"] == rec["step"] == 1 and rec["grad_norm"] > 0 and rec["reward_std"] > 0
    assert got["length_mean"] == rec["length_mean"] and got["reward_mean"] == rec["reward_mean"]
    assert got["loss"] == pytest.approx(rec["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(rec["grad_norm"], rel=1e-3)
    a = load_model(str(tmp_path / "eager" / "rl" / "model"))
    b = load_model(str(tmp_path / "compiled" / "rl" / "model"))
    assert a.state_dict().keys() == b.state_dict().keys()
    # Adam's first step moves each weight by ~lr·sign(g): where g is ~0, rounding-level gradient
    # differences can flip the sign, so a few elements may differ by up to 2·lr (lr = 3e-3 here)
    diff = torch.cat([(b.state_dict()[k] - v).abs().flatten() for k, v in a.state_dict().items()])
    assert float(diff.max()) <= 2 * 3e-3 and float((diff > 1e-5).float().mean()) < 1e-3


def test_rl_compile_refuses_a_model_without_blocks():
    from sputnik.train.session import _compile

    with pytest.raises(ValueError, match="no model.layers"):
        _compile(torch.nn.Linear(2, 2), blocks=True)


def test_rl_refuses_a_missing_init(tmp_path):
    with pytest.raises(ValueError, match="init"):
        rl.run(build(rl.Config, dict(out_dir=str(tmp_path / "rl"))))


def _sft_briefly(model, tok, examples, steps: int, lr: float = 1e-2, batch: int = 16):
    """A few AdamW steps of chat SFT (loss on the completion), in-process: a weak starting policy."""
    rows = [tok.render_chat(ex.prompt, format_completion(ex)) for ex in examples]
    T = max(len(ids) for ids, _ in rows)
    ids_NT = torch.full((len(rows), T), tok.pad_id)
    tgt_NT = torch.full((len(rows), T), -100)
    for n, (ids, mask) in enumerate(rows):
        ids_NT[n, :len(ids)] = torch.tensor(ids)
        nxt, keep = torch.tensor(ids[1:] + [-100]), torch.tensor(mask[1:] + [0]).bool()
        tgt_NT[n, :len(ids)] = torch.where(keep, nxt, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (batch,), generator=gen)
        loss = model(ids_NT[idx], tgt_NT[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def weak_policy_dir(tmp_path_factory):
    """A micro model after 60 SFT steps on 1-digit addition: writes the format ~1/4 of the time."""
    d = tmp_path_factory.mktemp("weak")
    torch.manual_seed(0)
    tok = train_tokenizer(corpus_text(["addition"], 300, seed=0), 320)
    model = build_model(tiny(**MICRO))
    _sft_briefly(model, tok, get_task("addition", max_digits=1).generate(256, split="train", seed=0), steps=60)
    save_model(model, d / "model", tok, tiny(**MICRO))
    return d / "model"


def _format_cfg(policy, tmp_path, **kw):
    return _cfg(policy, tmp_path, **{**dict(tasks=["addition:max_digits=1"], prompts_per_step=8, group_size=8,
                                            max_new_tokens=32, checkpoint_every=100, accuracy_weight=0.0,
                                            format_weight=1.0, dynamic_sampling=True,
                                            optim=dict(lr=3e-3, warmup_steps=0, schedule="constant",
                                                       weight_decay=0.0)), **kw})


def test_rl_raises_the_format_reward_of_a_weak_policy(weak_policy_dir, tmp_path):
    """The learning goal in small: 20 RL steps rewarding the <think>/<answer> format raise the
    format rate of the weak policy from ~1/3 to ~0.9: first two rollout batches (128 samples, at
    most one update) against the last five (measured 0.35 -> 0.91; it climbs fast, 0.77 by step 5;
    with other seeds of the policy 0.80 -> 0.94, 0.63 -> 0.94; on stop 18's Intel machine 0.51 ->
    0.95, the rounding of another CPU's kernels). Fails if the update does not follow
    the advantages (sign flipped: 0.14 -> 0.00), or if rollouts come from stale weights."""
    rl.run(_format_cfg(weak_policy_dir, tmp_path, steps=20))
    fmt = [json.loads(l)["format_rate"] for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[1:]]
    first, last = sum(fmt[:2]) / 2, sum(fmt[-5:]) / 5
    assert first < 0.6 and last > 0.75 and last > first + 0.3, (first, last)


def test_trainer_logprobs_are_the_sampled_policy(policy_dir, tmp_path):
    """The micro model's head has 320 rows, its tokenizer fewer; the engine samples from the
    tokenizer's rows only, so the trainer's softmax must too (it gave 0.105 per token before)."""
    rl.run(_cfg(policy_dir, tmp_path, steps=1, group_size=4))
    rec = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()][1]
    assert rec["logp_mismatch"] < 1e-4, rec["logp_mismatch"]


def test_rollouts_follow_the_updated_policy(weak_policy_dir, tmp_path):
    """On-policy: after every optimizer step the engine samples from the new weights, so the
    sampler's log-probs equal the trainer's (logp_mismatch ~1e-6 per token). It grows when an
    inference-weight cache goes stale (an optimizer step that does not bump the tensors' version
    counters, e.g. torch's fused CPU AdamW), or when the trainer's softmax covers the head's padding
    rows that the engine never samples (0.1 per token on an untrained head)."""
    rl.run(_format_cfg(weak_policy_dir, tmp_path, steps=4, prompts_per_step=4, group_size=4, dynamic_sampling=False))
    recs = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in recs)
    assert max(r["logp_mismatch"] for r in recs) < 1e-4, [r["logp_mismatch"] for r in recs]


def test_task_specs_reach_the_tasks(policy_dir, tmp_path, monkeypatch):
    """Task knobs ride in the task spec: the step's prompts are those of addition(max_digits=1),
    1-digit operands only; a bad knob is refused before anything is written."""
    drawn = []
    real = rl.sample_prompts

    def spy(tasks, *args, **kw):
        drawn.append(real(tasks, *args, **kw))
        return drawn[-1]

    monkeypatch.setattr(rl, "sample_prompts", spy)
    rl.run(_cfg(policy_dir, tmp_path, steps=1, tasks=["addition:max_digits=1"], prompts_per_step=4))
    rec = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 2
    (prompts,) = [[e.prompt for e in exs] for exs in drawn]
    assert prompts == [e.prompt for e in rl_prompts.sample_prompts([get_task("addition", max_digits=1)], 0, 4, 0)]
    operands = [x for p in prompts for x in p.removeprefix("What is ").rstrip("?").split(" + ")]
    assert len(operands) == 8 and all(x.isdigit() and len(x) == 1 for x in operands)
    with pytest.raises(ValueError, match="max_digits"):
        rl.run(_cfg(policy_dir, tmp_path / "bad", steps=1, tasks=["addition:max_digits=0"]))
    assert not (tmp_path / "bad").exists()  # refused before anything was written



def test_step_metrics_agree_with_each_other(weak_policy_dir, tmp_path):
    """With the format reward alone (0 or 1 per sample): reward mean = format rate, reward std =
    the Bessel-corrected Bernoulli std over the 64 samples, kept sequences = the groups with any
    variance x G."""
    rl.run(_format_cfg(weak_policy_dir, tmp_path, steps=2))
    for r in [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[1:]]:
        p = r["format_rate"]
        assert r["reward_mean"] == pytest.approx(p)
        assert r["reward_std"] == pytest.approx(math.sqrt(64 / 63 * p * (1 - p)), rel=1e-5)
        assert r["zero_variance_frac"] < 1.0 and r["kept_sequences"] == round(64 * (1 - r["zero_variance_frac"]))


def test_dynamic_sampling_drops_all_equal_groups(policy_dir, tmp_path):
    """An untrained policy earns 0 everywhere: every group has zero variance, nothing is kept and no
    update runs: its update metrics are absent (not 0), and the weights are those it started from."""
    rl.run(_cfg(policy_dir, tmp_path, steps=1, dynamic_sampling=True))
    rec = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()][1]
    assert rec["reward_std"] == 0.0 and rec["zero_variance_frac"] == 1.0
    assert rec["kept_sequences"] == 0
    assert not {"loss", "entropy", "kl", "clip_frac", "grad_norm", "logp_mismatch"} & set(rec)
    from safetensors.torch import load_file

    before, after = load_file(str(policy_dir / "model.safetensors")), load_file(str(tmp_path / "rl" / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_health_check_stops_the_run_when_told_to(policy_dir, tmp_path, capsys):
    """A health stop is its own exception and its own ledger status ("stopped", neither "aborted" as
    a user's Ctrl-C nor "failed"), and `sputnik rl` exits 4 with the reason."""
    cfg = _cfg(policy_dir, tmp_path, dynamic_sampling=False,
               health=dict(window=1, min_entropy=1e9, stop_on_pathology=True))
    with pytest.raises(HealthStop, match="stopped by a health check at step 1: truncation"):
        rl.run(cfg)
    recs = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 1  # stopped after the first step, whose record (and warnings) was written
    assert any(w.startswith("entropy collapse") for w in recs[-1]["warnings"])
    rows = [r for r in ledger.load(tmp_path) if r["command"] == "rl"]
    assert rows[-1]["status"] == "stopped" and "truncation" in rows[-1]["error"]
    from sputnik.cli import main

    args = ["rl", "--init", str(policy_dir), "--out_dir", str(tmp_path / "cli"), "--tasks", "addition", "--steps", "2",
            "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--eval_examples", "4",
            "--num_threads", "1", "--dynamic_sampling", "false", "--health.window", "1", "--health.min_entropy", "1e9",
            "--health.stop_on_pathology", "true"]
    assert main(args) == 4
    assert "stopped: stopped by a health check at step 1: truncation" in capsys.readouterr().err


def test_nonfinite_updates_are_skipped_then_stop_the_run(policy_dir, tmp_path):
    """The RL loop's non-finite guard, as every loop's: a poisoned update is skipped (weights, biases
    and Adam moments untouched; its expert load discarded) and max_nonfinite_steps in a row stop the
    run with TrainingDiverged, keeping the last good checkpoint."""
    from safetensors.torch import load_file

    from sputnik.train.session import TrainingDiverged

    kw = dict(dynamic_sampling=False, checkpoint_every=1, keep_last=5)
    rl.run(_cfg(policy_dir, tmp_path / "a", steps=2, poison_steps=[1], **kw))
    recs = [json.loads(l) for l in (tmp_path / "a" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in recs if r["step"] > 0 and "skipped" in r] == [0, 1]
    assert any(r.get("nonfinite") for r in recs)
    ck = tmp_path / "a" / "rl" / "checkpoints"
    one, two = load_file(str(ck / "ckpt-000001" / "model.safetensors")), load_file(str(ck / "ckpt-000002" / "model.safetensors"))
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step left no trace, router biases included
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert one[bias].abs().sum() > 0  # the taken step 1 moved the bias from its initial zeros; step 2 did not
    opt1, opt2 = (torch.load(ck / f"ckpt-00000{i}" / "optimizer.pt", weights_only=False) for i in (1, 2))
    moments = lambda o: [t for st in o["state"].values() for t in st.values() if torch.is_tensor(t)]  # noqa: E731
    assert moments(opt1) and all(torch.equal(a, b) for a, b in zip(moments(opt1), moments(opt2)))  # Adam's too
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        rl.run(_cfg(policy_dir, tmp_path / "b", steps=4, poison_steps=[1, 2], max_nonfinite_steps=2, **kw))
    assert (tmp_path / "b" / "rl" / "checkpoints" / "ckpt-000001").is_dir()
    assert not (tmp_path / "b" / "rl" / "checkpoints" / "ckpt-000002").exists()


# ---------------------------------------------------------------------------------------------
# Learnability task sampling
def test_allocate_splits_exactly_by_largest_remainder():
    assert rl_prompts._allocate(64, [1, 1]) == [32, 32]
    assert rl_prompts._allocate(10, [0.05, 0.2275]) == [2, 8]  # 1.77 -> 2, 8.05 -> 8
    assert rl_prompts._allocate(7, [1, 1, 1]) == [3, 2, 2]
    assert sum(rl_prompts._allocate(61, [0.3, 0.05, 0.11])) == 61


def test_learnability_shares_are_bernoulli_variances_with_a_floor():
    shares = rl_prompts.learnability_shares({"addition": 0.95, "subtraction": 0.65}, ["addition", "subtraction", "new"])
    assert shares == pytest.approx([rl_prompts.LEARNABILITY_FLOOR, 0.65 * 0.35, 0.25])
    assert rl_prompts.learnability_shares({"a": 0.0, "b": 1.0}, ["a", "b"]) == [rl_prompts.LEARNABILITY_FLOOR] * 2


def test_task_accuracy_is_a_running_mean_per_task():
    acc = {}
    names = ["a", "a", "b", "b"]
    rl_prompts.update_task_accuracy(acc, names, [True, True, False, True])
    assert acc == {"a": 1.0, "b": 0.5}
    rl_prompts.update_task_accuracy(acc, names[:2], [False] * 2)
    assert acc == {"a": 0.5, "b": 0.5}  # b unseen this step: unchanged


def test_sample_prompts_follow_the_shares_and_are_deterministic():
    tasks = [get_task("addition"), get_task("subtraction")]
    exs = rl_prompts.sample_prompts(tasks, step=3, n=10, seed=0, shares=[0.05, 0.2275])
    assert [e.task for e in exs].count("subtraction") == 8
    assert [e.prompt for e in exs] == [e.prompt for e in rl_prompts.sample_prompts(tasks, 3, 10, 0, [0.05, 0.2275])]
    rr = rl_prompts.sample_prompts(tasks, step=3, n=4, seed=0)
    assert [e.task for e in rr] == ["addition", "subtraction"] * 2


def test_rl_with_learnability_sampling_records_task_accuracy_and_resumes_it(policy_dir, tmp_path):
    cfg = _cfg(policy_dir, tmp_path, tasks=["addition", "subtraction"], prompts_per_step=4,
               task_sampling="learnability", steps=2)
    rl.run(cfg)
    recs = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert set(recs[-1]["task_accuracy"]) == {"addition", "subtraction"}
    from sputnik.train import checkpoint as ckpt

    state = json.loads((ckpt.resolve("latest", str(tmp_path / "rl")) / "state.json").read_text())
    assert state["loop_state"]["task_accuracy"] == recs[-1]["task_accuracy"]


def test_reward_fn_by_import_path_reaches_the_rewards(policy_dir, tmp_path):
    """`--reward_fn module:function` runs isolated and is added to the verifier's reward: an
    untrained policy earns nothing from the verifier, so every reward here is the plug-in's
    (raising_reward: 1.0 for any completion without "boom")."""
    rl.run(_cfg(policy_dir, tmp_path, steps=1, reward_fn="reward_fixtures:raising_reward"))
    rec = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()][1]
    assert rec["accuracy"] == 0.0 and rec["format_rate"] == 0.0
    assert rec["reward_mean"] == 1.0 and rec["reward_failures"] == 0


def test_rollouts_count_in_the_ledger_even_when_every_group_is_dropped(policy_dir, tmp_path):
    """Sampling is spent whether or not dynamic sampling keeps a group: an untrained policy's groups
    all score 0 and are dropped (no update), yet the run's FLOPs are its rollouts' exactly."""
    from sputnik.rl.update import rollout_flops
    from sputnik.train.loading import flops_per_token, load_model

    res = rl.run(_cfg(policy_dir, tmp_path, dynamic_sampling=True, steps=1, format_weight=0.0))
    rec = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()][-1]
    row = [r for r in ledger.load(tmp_path) if r["command"] == "rl"][-1]
    assert rec["kept_sequences"] == 0 and "loss" not in rec  # nothing kept, no update
    assert row["flops"] > 0 and res["run_ids"] == [row["run_id"]]

    class C:
        def __init__(self, n):
            self.token_ids = list(range(n))

    model = load_model(str(policy_dir))
    assert rollout_flops(model, [[1, 2, 3]], [C(4), C(5)]) == pytest.approx(12 * flops_per_token(model, 8) / 3)
