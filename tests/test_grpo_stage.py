"""`sputnik rl` end to end on a micro model: steps run, metrics and the ledger are written, a
resumed run continues from its checkpoint, a prefilled template is refused."""
import json

import pytest

from sputnik import ledger
from sputnik.config import build
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.stages import grpo
from sputnik.tasks import corpus_text
from sputnik.tokenizer import train_tokenizer
from sputnik.train_common import save_model

MICRO = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
             moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=2,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             num_nextn_predict_layers=0, max_position_embeddings=256)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    tok = train_tokenizer(corpus_text(["addition"], 300, seed=0), 320)
    save_model(build_model(tiny(**MICRO)), d / "model", tok, tiny(**MICRO))
    return d / "model"


def _cfg(policy_dir, tmp_path, **kw):
    return build(grpo.RLConfig, {**dict(init=str(policy_dir), out_dir=str(tmp_path / "rl"), ledger_dir=str(tmp_path),
                                        tasks=["addition"], steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8,
                                        eval_every=0, eval_examples=4, checkpoint_every=1, num_threads=1,
                                        dynamic_sampling=False), **kw})


def test_rl_runs_writes_metrics_ledger_and_resumes(policy_dir, tmp_path):
    res = grpo.run(_cfg(policy_dir, tmp_path))
    recs = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward_mean", "accuracy", "format_rate", "length_mean", "time_rollout", "time_update", "loss"):
        assert key in steps[0], key
    assert recs[0]["step"] == 0 and "heldout_accuracy" in recs[0]
    rows = [r for r in ledger.load(tmp_path) if r["command"] == "rl"]
    assert rows[-1]["status"] == "ok" and rows[-1]["flops"] > 0
    assert (tmp_path / "rl" / "model" / "config.json").is_file() and res["accuracy_curve"]
    # as if killed after step 1: the latest complete checkpoint is step 1; resume runs only step 2
    import shutil
    ck = tmp_path / "rl" / "checkpoints"
    shutil.rmtree(ck / "ckpt-000002")
    (ck / "latest").write_text("ckpt-000001\n")
    grpo.run(_cfg(policy_dir, tmp_path, resume="auto"))
    recs = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["step"] > 0] == [1, 2, 2]


def test_rl_refuses_a_missing_init(tmp_path):
    with pytest.raises(ValueError, match="init"):
        grpo.run(build(grpo.RLConfig, dict(out_dir=str(tmp_path / "rl"))))
