"""Abacus positions (model/abacus.py): place indices, the training offset, the cached decode, adding
the option to a trained model, export and reload, and the configs it refuses."""
import warnings

from test_stages import pretrained, ws  # noqa: F401  (fixtures: a tokenizer and a tiny pretrained base)

import pytest
import torch

from sputnik.model import build_model
from sputnik.model.abacus import digit_runs
from sputnik.model.config import ModelConfig, tiny
from sputnik.rl.rollout import build_rollout_batch, policy_logprobs, policy_logprobs_shared

DIGITS = list(range(1, 11))  # token ids 1..10 stand for the digits 0..9 in these tests
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, initializer_range=0.1)


def _model(**kw):
    torch.manual_seed(0)
    return build_model(tiny(**SMALL, **kw))


def test_digit_runs_count_places_from_each_runs_start():
    ids = torch.tensor([[20, 1, 2, 3, 30, 4, 31, 5, 6], [7, 8, 40, 9, 9, 9, 9, 41, 42]])
    expect = [[0, 1, 2, 3, 0, 1, 0, 1, 2], [1, 2, 0, 1, 2, 3, 4, 0, 0]]
    assert digit_runs(ids, torch.tensor(DIGITS)).tolist() == expect
    # a cached continuation: column 0 continues the run its row left off (3 and 0 places before)
    cont = digit_runs(torch.tensor([[1, 2, 50, 3], [4, 60, 5, 6]]), torch.tensor(DIGITS), previous_B=torch.tensor([3, 0]))
    assert cont.tolist() == [[4, 5, 0, 1], [1, 0, 1, 2]]


def test_the_table_changes_only_digit_tokens_logits_and_training_draws_an_offset():
    m = _model(abacus_max_index=12, abacus_train_offset=4, abacus_digit_ids=DIGITS).eval()
    ids = torch.tensor([[20, 1, 2, 3, 30, 4]])
    base = m(ids).logits
    with torch.no_grad():
        m.model.abacus_embed.weight[5:].add_(1.0)  # rows 5.. are reached only with an offset (places 1-3 here)
    assert torch.equal(m(ids).logits, base)
    m.train()
    losses = {float(m(ids, torch.tensor([[1, 2, 3, 30, 4, -100]])).loss) for _ in range(12)}
    assert len(losses) > 1  # a random offset per sequence reaches the changed rows
    m.eval()
    assert float(m(ids, torch.tensor([[1, 2, 3, 30, 4, -100]])).loss) == float(m(ids, torch.tensor([[1, 2, 3, 30, 4, -100]])).loss)


def test_adding_the_option_to_a_trained_model_keeps_its_logits_until_trained():
    m = _model()
    ids = torch.tensor([[20, 1, 2, 3, 30, 4, 5]])
    before = m(ids).logits
    m.add_abacus(16, 8, DIGITS)
    assert m.config.abacus_max_index == 16 and m.config.abacus_digit_ids == DIGITS
    assert torch.equal(m(ids).logits, before)
    with pytest.raises(ValueError, match="already has Abacus"):
        m.add_abacus(16, 8, DIGITS)


def test_export_and_reload_keep_the_table(tmp_path):
    from sputnik.model.hf import load_hf, save_hf

    m = _model(abacus_max_index=12, abacus_train_offset=4, abacus_digit_ids=DIGITS).eval()
    with pytest.warns(UserWarning, match="transformers .* would skip model.abacus_embed.weight"):
        save_hf(m, tmp_path / "m")
    back = load_hf(tmp_path / "m").eval()
    assert back.config.abacus_max_index == 12 and back.config.abacus_digit_ids == DIGITS
    ids = torch.tensor([[20, 1, 2, 3, 30, 4, 5]])
    torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)


def test_load_model_adds_the_option_to_a_model_directory(tmp_path):
    from sputnik.model.hf import save_hf
    from sputnik.train.loading import load_model

    save_hf(_model(), tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for Abacus on a loaded model is not "settings ignored"
        m = load_model(str(tmp_path / "base"), ModelConfig(abacus_max_index=20, abacus_train_offset=10,
                                                           abacus_digit_ids=DIGITS))
    assert m.config.abacus_max_index == 20 and float(m.model.abacus_embed.weight.abs().sum()) == 0.0


def test_shared_prompt_layout_continues_each_prompts_run():
    """Prompts ending in a digit and completions starting with one: the packed update must give each
    completion the places of [prompt; completion], not restart its run."""
    m = _model(abacus_max_index=16, abacus_train_offset=4, abacus_digit_ids=DIGITS).train()
    prompts = [[30, 1, 2, 3]] * 3 + [[31, 4]] * 3
    completions = [[5, 6, 40], [7, 41], [8, 9, 10, 1], [2, 3], [42, 4], [5]]
    batch = build_rollout_batch(prompts, completions, [[0.0] * len(c) for c in completions], pad_id=0)
    plain, _, _ = policy_logprobs(m, batch)
    shared, _, _ = policy_logprobs_shared(m, batch)
    torch.testing.assert_close(shared, plain, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(abacus_train_offset=3), "need abacus_max_index"),
    (dict(abacus_max_index=8, abacus_train_offset=8), "must be < abacus_max_index"),
    (dict(abacus_max_index=8, abacus_digit_ids=[1, 2, 3]), "10 distinct token ids"),
    (dict(abacus_max_index=8, architecture="llama"), "implemented for deepseek_v3"),
])
def test_bad_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_a_model_needs_its_digit_ids_and_a_tokenizer_must_split_digits():
    with pytest.raises(ValueError, match="needs abacus_digit_ids"):
        _model(abacus_max_index=8)
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from sputnik.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate("0123456789+ ")} | {"12": 12}
    backend = Backend(models.WordLevel(vocab, unk_token=" "))
    backend.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok = Tokenizer.__new__(Tokenizer)
    tok.backend, tok.source = backend, "<test>"
    assert tok.digit_ids() == list(range(10))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="does not write each digit as one token"):
        tok.digit_ids()


def test_sft_adds_the_option_to_a_base_records_it_and_resumes_bit_exactly(pretrained, tmp_path):
    """`sft --init BASE` with Abacus settings: the run fills the digit ids from the tokenizer, trains
    the table (random offsets from the checkpointed RNG: a resumed run ends on the same weights) and
    exports a model that reloads with the option."""
    import json
    import os

    from test_stages import ckpt_tensors, assert_same_tensors, sft_cfg

    from sputnik.stages import sft
    from sputnik.train.loading import load_model, load_tokenizer

    base = pretrained[0] / "model"
    abacus = dict(abacus_max_index=16, abacus_train_offset=6)
    full = tmp_path / "full"
    sft.run(sft_cfg(full, base, model=abacus, eval_every=0, keep_last=5))
    digits = load_tokenizer("", str(base)).digit_ids()
    saved = json.loads((full / "stage_config.json").read_text())["model"]
    assert saved["abacus_max_index"] == 16 and saved["abacus_digit_ids"] == digits
    trained = load_model(str(full / "model"))
    assert trained.config.abacus_digit_ids == digits and float(trained.model.abacus_embed.weight.abs().sum()) > 0
    part = tmp_path / "part"
    part.mkdir()
    os.system(f"cp -r {full}/checkpoints {full}/metrics.jsonl {part}/")
    os.system(f"rm -rf {part}/checkpoints/ckpt-000006")
    sft.run(sft_cfg(part, base, model=abacus, eval_every=0, keep_last=5, resume="auto"))
    assert_same_tensors(ckpt_tensors(full / "checkpoints" / "ckpt-000006"), ckpt_tensors(part / "checkpoints" / "ckpt-000006"))
    reloaded = load_model(str(full / "checkpoints" / "ckpt-000006"))  # a checkpoint rebuilds base + option
    assert reloaded.config.abacus_max_index == 16
