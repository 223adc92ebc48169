"""The stages' goal on the arithmetic corpus: a tiny DeepSeek-V3 pretrained on the task text, then SFT
on the step-by-step traces, reaches the held-out loss and exact-match figures the issue set (the full
run is slow-marked; a cut-short run checks the same pipeline in the default suite)."""
import time

import pytest

from sputnik.config import build
from sputnik.stages import pretrain, sft
from sputnik.tasks import parse_tasks
from test_stages import assert_stage_accuracy_is_recomputed, metrics

GOAL_MODEL = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                  n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)


def _goal(tmp_path, pre_steps, sft_steps, eval_examples, tasks=("addition",), model=None, threads=0):
    from sputnik.tasks import corpus_text
    from sputnik.tokenizer import train_tokenizer

    tasks = list(tasks)
    train_tokenizer(corpus_text(parse_tasks(tasks), 2000, seed=1), 384).save(tmp_path / "tok")
    t0, c0 = time.time(), time.process_time()
    pre = pretrain.run(build(pretrain.Config, dict(
        out_dir=str(tmp_path / "pre"), tokenizer=str(tmp_path / "tok"), tasks=tasks, task_docs=4000, model=model or GOAL_MODEL,
        seq_len=128, batch_size=16, steps=pre_steps, eval_every=max(1, pre_steps // 4), eval_batches=4,
        checkpoint_every=pre_steps, log_every=25, num_threads=threads, progress=False,
        optim={"lr": 3e-3, "warmup_steps": 20})))
    t_pre, cpu_pre = time.time() - t0, time.process_time() - c0
    print(f"pretrain: {t_pre:.0f}s wall, {cpu_pre:.0f}s CPU")
    pre["cpu_s"] = cpu_pre
    sft_config = build(sft.Config, dict(
        out_dir=str(tmp_path / "sft"), init=str(tmp_path / "pre" / "model"), tasks=tasks, num_examples=4000,
        eval_examples=eval_examples, max_new_tokens=100, batch_size=16, steps=sft_steps, eval_every=0,
        checkpoint_every=sft_steps, log_every=25, num_threads=threads, progress=False, max_len=192,
        optim={"lr": 2e-3, "warmup_steps": 10}))
    post = sft.run(sft_config)
    post["config"] = sft_config
    return pre, post, t_pre, time.time() - t0 - t_pre


def test_goal_small_arithmetic(tmp_path):
    """Slower (~20-35 s): the goal run cut short. Measured (1 thread): pretraining held-out loss
    5.95 -> 2.02 in 60 steps; 40 SFT steps then give held-out loss 1.66 (accuracy still 0)."""
    pre, post, t_pre, t_sft = _goal(tmp_path, pre_steps=60, sft_steps=40, eval_examples=8, threads=1)
    print(f"goal-small: pretrain eval {pre['final_eval_loss']:.3f} in {t_pre:.0f}s; "
          f"sft eval {post['final_eval_loss']:.3f}, accuracy {post['accuracy']:.3f} in {t_sft:.0f}s")
    evals = [m["eval_loss"] for m in metrics(tmp_path / "pre") if "eval_loss" in m]
    assert evals[0] > 5.5 and pre["final_eval_loss"] < 2.3
    assert post["final_eval_loss"] < 1.9 and post["accuracy"] == 0.0  # 40 SFT steps: format, not yet sums
    assert_stage_accuracy_is_recomputed(post, tmp_path / "sft", post["config"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_goal_arithmetic(tmp_path):
    """The issue's goal, measured on this project's 2-vCPU machine with one thread (2026-11-23):
    pretraining 800 steps x 2,048 tokens: held-out loss 5.95 -> 1.12 (step 200) -> 0.86 (400) ->
    0.72 (600) -> 0.62 (800) in 131 s wall (111 s CPU); SFT 1,000 steps on the step-by-step traces:
    held-out loss 0.019, exact-match 0.758 (97/128 test problems, 1-4 digit addition), format 0.99,
    134 s. The 180 s budget is checked on CPU seconds. Thresholds leave room for other machines
    (accuracy: 4 binomial s.d. below the measurement)."""
    pre, post, t_pre, t_sft = _goal(tmp_path, pre_steps=800, sft_steps=1000, eval_examples=128, threads=1)
    print(f"goal: pretrain eval {pre['final_eval_loss']:.3f} in {t_pre:.0f}s; "
          f"sft eval {post['final_eval_loss']:.3f}, accuracy {post['accuracy']:.3f} in {t_sft:.0f}s")
    # One thread, so CPU seconds = wall seconds on an idle machine; wall time itself is not
    # asserted because this 2-vCPU machine is shared (measured 131 s idle, 272 s contended).
    assert pre["cpu_s"] <= 180
    assert pre["final_eval_loss"] < 0.70
    assert post["final_eval_loss"] < 0.05
    assert post["accuracy"] >= 0.6
