"""SFT's line gaps (train/position_gaps.py): positions skip a random 0..G after each line end, stay
consecutive within a line, never pass the table; the model takes per-row positions (MTP too); an SFT
run with gaps trains, resumes bit for bit and differs from one without; a model without positions is
refused."""
import os

import pytest
import torch

from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.stages import sft
from sputnik.train.position_gaps import (digit_end_ids, gapped_positions, gapped_rows, line_end_ids, line_gaps,
                                         prompt_digit_gaps)

from test_stages import assert_same_tensors, ckpt_tensors, pretrained, sft_cfg, ws  # noqa: F401

ENDS = torch.tensor([3, 9])


def test_gaps_open_after_line_ends_only_and_stay_within_the_table():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 3, 6, 7, 9, 8, 8, 9, 4, 4]] * 200)
    pos = gapped_positions(line_gaps(ids, ENDS, 4), 64)
    step = pos[:, 1:] - pos[:, :-1]
    after_end = torch.isin(ids[:, :-1], ENDS)
    assert (step[~after_end] == 1).all()  # within a line: consecutive
    assert step[after_end].min() == 1 and step[after_end].max() == 5  # 1 + a gap of 0..4, both ends drawn
    assert pos[:, :2].tolist() == [[0, 1]] * 200  # nothing moves before the first line end has passed
    assert len({tuple(p) for p in pos.tolist()}) > 50  # each row its own draw
    assert gapped_positions(line_gaps(ids, ENDS, 0), 64).tolist() == [list(range(10))] * 200
    capped = gapped_positions(line_gaps(ids, ENDS, 100), 12)
    assert capped.max() <= 11 and (capped[:, 1:] >= capped[:, :-1]).all()
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        gapped_positions(line_gaps(ids, ENDS, 2), 8)


def test_prompt_gaps_open_after_prompt_digits_only():
    """user=1, assistant=2, digits 5 and 6: gaps open after a digit between a user marker and its assistant
    marker, nowhere else (not after the answer's digits, nor a second prompt's markers)."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 7, 5, 8, 6, 2, 5, 6, 9, 1, 5, 2, 5]] * 300)
    gap = prompt_digit_gaps(ids, torch.tensor([5, 6]), 1, 2, 3)
    opens = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    assert (gap[:, ~opens] == 0).all()
    assert gap[:, opens].min() == 0 and gap[:, opens].max() == 3
    pos = gapped_positions(gap, 64)
    assert (pos[:, 3] - pos[:, 2] - 1 == gap[:, 2]).all() and (pos[:, 5] - pos[:, 4] - 1 == gap[:, 4]).all()


def test_gapped_rows_keep_a_share_of_the_rows_consecutive():
    torch.manual_seed(0)
    gap = line_gaps(torch.tensor([[5, 3, 6, 9, 8, 3, 4]] * 400), ENDS, 4) + 1  # every position gapped, for the count
    state = torch.get_rng_state()
    assert gapped_rows(gap, 1.0) is gap and torch.equal(torch.get_rng_state(), state)  # no draw: old runs unchanged
    assert not gapped_rows(gap, 0.0).any()
    half = gapped_rows(gap, 0.5)
    kept = half.any(1)
    assert torch.equal(half[kept], gap[kept]) and not half[~kept].any()  # whole rows, kept or zeroed
    assert 150 < int(kept.sum()) < 250


def test_line_ends_of_a_tokenizer(ws):  # noqa: F811
    from sputnik.tokenizer import Tokenizer

    tok = Tokenizer.load(ws / "tok")
    ends = line_end_ids(tok)
    assert tok.render_prompt("")[-1] in ends
    assert all("\n" in tok.decode([i]) or i in (tok.assistant_id, tok.token_to_id("</think>")) for i in ends)
    assert set(tok.encode("a\nb")) & set(ends)
    digits = digit_end_ids(tok)
    assert all(tok.decode([i])[-1].isdigit() for i in digits) and set(tok.encode("7")) <= set(digits)


def test_model_with_given_positions():
    """positions 0..T−1 given per row equal the default; gaps change the logits after the gap only; the
    MTP loss runs with per-row positions."""
    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                             num_nextn_predict_layers=1, max_position_embeddings=64)).eval()
    ids = torch.randint(4, 64, (2, 12))
    targets = torch.randint(4, 64, (2, 12))
    with torch.no_grad():
        plain = model(ids, targets)
        same = model(ids, targets, positions_BT=torch.arange(12).expand(2, 12))
        assert torch.equal(plain.loss, same.loss) and torch.equal(plain.mtp_loss, same.mtp_loss)
        shifted = torch.arange(12).expand(2, 12) + torch.tensor([0] * 5 + [7] * 7)
        a, b = model(ids).logits, model(ids, positions_BT=shifted).logits
        assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-4)
        gapped = model(ids, targets, positions_BT=shifted)
        assert gapped.mtp_loss != plain.mtp_loss and torch.isfinite(gapped.loss)


def test_sft_with_line_and_prompt_gaps_trains_resumes_bit_for_bit_and_differs(pretrained, tmp_path):  # noqa: F811
    out = pretrained[0]
    kw = dict(eval_every=0, keep_last=5, position_gaps=6, prompt_gaps=3, gapped_rows=0.5)
    full = sft.run(sft_cfg(tmp_path / "full", out / "model", **kw))
    part = tmp_path / "part"
    part.mkdir()
    os.system(f"cp -r {tmp_path / 'full'}/checkpoints {tmp_path / 'full'}/metrics.jsonl {part}/")
    os.system(f"rm -rf {part}/checkpoints/ckpt-000006")
    sft.run(sft_cfg(part, out / "model", resume="auto", **kw))
    assert_same_tensors(ckpt_tensors(tmp_path / "full" / "checkpoints" / "ckpt-000006"),
                        ckpt_tensors(part / "checkpoints" / "ckpt-000006"))
    final = "checkpoints/ckpt-000006/model.safetensors"
    runs = {"line and prompt gaps": tmp_path / "full"}
    for name, gaps in [("plain", {}), ("line gaps", dict(position_gaps=6)), ("prompt gaps", dict(prompt_gaps=3))]:
        sft.run(sft_cfg(tmp_path / name, out / "model", eval_every=0, **gaps))
        runs[name] = tmp_path / name
    weights = {name: ckpt_tensors((d / final).parent) for name, d in runs.items()}
    for a in weights:  # each kind of gap moves positions the others leave alone: four different models
        for b in weights:
            if a < b:
                assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)


def test_position_gaps_refused_for_a_model_without_positions(ws, tmp_path):  # noqa: F811
    from test_stages import TINY_DENSE, pre_cfg

    from sputnik.stages import pretrain

    pretrain.run(pre_cfg(ws, tmp_path / "pre", steps=2, model=TINY_DENSE))
    with pytest.raises(ValueError, match="position_gaps=4: .* takes no positions"):
        sft.run(sft_cfg(tmp_path / "sft", tmp_path / "pre" / "model", position_gaps=4))
    with pytest.raises(ValueError, match="prompt_gaps=2: .* takes no positions"):
        sft.run(sft_cfg(tmp_path / "sft2", tmp_path / "pre" / "model", prompt_gaps=2))
