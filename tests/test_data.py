"""Data: exact packing, bit-identical resume, rank sharding, SFT target masks, JSONL errors."""
import json

import pytest
import torch

from sputnik.data import (IGNORE_INDEX, PackedDataset, check_vocab, read_sft_jsonl, read_text_files, sft_batches,
                          split_documents, tokenize_documents, train_eval_tokens)
from sputnik.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    docs = [f"<|user|>What is {a}+{a}?<|assistant|><think>{a}+{a}={2 * a}</think><answer>{2 * a}</answer>"
            for a in range(200)] + ["the cat sat on the mat"] * 20
    return train_tokenizer(docs, vocab_size=320)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))


# ---------------------------------------------------------------------------------------------
# Pretraining packing
def test_packing_reproduces_the_stream_exactly():
    tokens = torch.arange(1000, 1103)  # 103 tokens, T=10 -> 10 windows, 5 batches of 2
    loader = PackedDataset(tokens, batch_size=2, seq_len=10, shuffle=False, num_epochs=1)
    batches = list(loader)
    assert len(batches) == 5 and batches[0][0].shape == (2, 10) and batches[0][0].dtype == torch.long
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(), tokens[:100])
    assert torch.equal(torch.cat([y for _, y in batches]).flatten(), tokens[1:101])


def test_shuffled_epoch_visits_every_window_once_and_epochs_differ():
    loader = PackedDataset(torch.arange(121), batch_size=3, seq_len=10, seed=5)  # 12 windows, 4 steps
    starts = [x[:, 0] for x, _ in take(loader, 8)]
    epoch0, epoch1 = torch.cat(starts[:4]), torch.cat(starts[4:])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(0, 120, 10))
    assert not torch.equal(epoch0, epoch1)
    assert loader.state_dict()["epoch"] == 1


def test_resume_mid_epoch_is_identical_across_the_epoch_boundary():
    make = lambda: PackedDataset(torch.arange(257), batch_size=4, seq_len=8, seed=3)  # 32 windows, 8 steps
    a = make()
    take(a, 5)
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON checkpoint
    assert state == {"epoch": 0, "cursor": 20, "seed": 3, "shuffle": True, "num_items": 32}
    b = make()
    b.load_state_dict(state)
    assert same(take(a, 12), take(b, 12))


def test_rank_sharding_disjoint_complete_and_equal_to_one_big_batch():
    tokens = torch.arange(321)  # 40 windows of 8
    single = PackedDataset(tokens, batch_size=4, seq_len=8, seed=1)
    ranks = [PackedDataset(tokens, batch_size=2, seq_len=8, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [set(), set()]
    for _ in range(10):  # one epoch
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        for r, (xr, _) in enumerate(parts):
            seen[r] |= set(xr[:, 0].tolist())
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(0, 320, 8))


def test_resume_with_a_different_world_size_at_the_same_global_batch():
    tokens = torch.arange(321)
    single = PackedDataset(tokens, batch_size=4, seq_len=8, seed=2)
    take(single, 3)
    ranks = [PackedDataset(tokens, batch_size=2, seq_len=8, seed=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(single.state_dict())
    x, _ = next(single)
    assert torch.equal(torch.cat([next(r)[0] for r in ranks]), x)


def test_loader_errors():
    with pytest.raises(ValueError, match="dataset tiny .*fewer than one global batch"):
        PackedDataset(torch.arange(20), batch_size=4, seq_len=8, name="tiny")
    with pytest.raises(ValueError, match="dataset pretraining data is empty"):
        PackedDataset(torch.tensor([], dtype=torch.long), batch_size=1, seq_len=8)
    loader = PackedDataset(torch.arange(100), batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="state is for 99 items but this dataset has 12"):
        loader.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0, "shuffle": True, "num_items": 99})


def test_documents_are_followed_by_eot(tok):
    stream = tokenize_documents(["ab", "", "1"], tok)
    assert stream.tolist() == [*tok.encode("ab"), 1, tok.token_to_id("1"), 1]
    assert stream.dtype == torch.int32


def test_held_out_split_is_deterministic_disjoint_and_nonempty(tok):
    docs = [f"doc {i}" for i in range(50)] + ["doc 3"]  # a duplicate must not leak across the split
    train, held = split_documents(docs, 0.2)
    rtrain, rheld = split_documents(list(reversed(docs)), 0.2)
    assert sorted(rtrain) == sorted(train) and sorted(rheld) == sorted(held)  # order-independent
    assert ("doc 3" in train) == ("doc 3" not in held)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 51 and 3 <= len(held) <= 20
    assert split_documents(["a", "b"], 0.01)[1] and split_documents(["a", "b"], 0.99)[0]
    tr, ev = train_eval_tokens(["x " * 100], tok, eval_fraction=0.1)  # one document: token-level cut
    assert torch.equal(torch.cat([tr, ev]), tokenize_documents(["x " * 100], tok)) and len(ev) == 20


def test_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n", encoding="utf-8")
    assert read_text_files([tmp_path / "a.txt"]) == ["héllo\n"]
    with pytest.raises(ValueError, match="b.txt does not exist"):
        read_text_files([tmp_path / "b.txt"])
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="c.txt is not UTF-8"):
        read_text_files([tmp_path / "c.txt"])


# ---------------------------------------------------------------------------------------------
# SFT batches
def test_sft_targets_and_padding_hand_checked(tok):
    d = {c: tok.token_to_id(c) for c in "12+"}
    pairs = [("1+1", "<think>2</think><answer>2</answer>"), ("1", "<answer>1</answer>")]
    x, y = next(sft_batches(pairs, tok, batch_size=2, max_len=64, shuffle=False))
    # ids row 0: <|user|> 1 + 1 <|assistant|> <think> 2 </think> <answer> 2 </answer> <|endoftext|>
    assert x.tolist() == [[2, d["1"], d["+"], d["1"], 3, 4, d["2"], 5, 6, d["2"], 7],
                          [2, d["1"], 3, 6, d["1"], 7, 0, 0, 0, 0, 0]]
    m = IGNORE_INDEX
    assert y.tolist() == [[m, m, m, m, 4, d["2"], 5, 6, d["2"], 7, 1],
                          [m, m, 6, d["1"], 7, 1, m, m, m, m, m]]


def test_sft_drops_long_sequences_and_rejects_empty(tok):
    pairs = [("1", "<answer>1</answer>"), ("1+1+1+1+1+1", "<think>" + "1" * 30 + "</think>")]
    loader = sft_batches(pairs, tok, batch_size=1, max_len=6)
    assert loader.num_dropped == 1 and len(loader.rows) == 1
    with pytest.raises(ValueError, match="dataset sft data is empty after dropping 2 sequences longer than max_len=3"):
        sft_batches(pairs, tok, batch_size=1, max_len=3)
    with pytest.raises(ValueError, match="dataset mine is empty"):
        sft_batches([], tok, batch_size=1, max_len=3, name="mine")


def test_sft_sharding_and_resume(tok):
    pairs = [(f"{i}+{i}", f"<think>{'1' * (i % 7)}</think><answer>{2 * i}</answer>") for i in range(24)]
    single = sft_batches(pairs, tok, batch_size=4, max_len=64, seed=9)
    ranks = [sft_batches(pairs, tok, batch_size=2, max_len=64, seed=9, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):  # crosses an epoch (6 steps per epoch)
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    resumed = sft_batches(pairs, tok, batch_size=4, max_len=64, seed=9)
    resumed.load_state_dict(single.state_dict())
    assert same(take(single, 7), take(resumed, 7))


# ---------------------------------------------------------------------------------------------
# JSONL
def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [json.dumps({"prompt": "1+1", "completion": "<answer>2</answer>"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})]


def test_jsonl_formats_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD[0], "", "   ", GOOD[1]])
    assert read_sft_jsonl(path) == ([("1+1", "<answer>2</answer>"), ("hi", "yo")], 0)


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"question": "x"}), "expected keys prompt\\+completion"),
    (json.dumps({"prompt": 3, "completion": "x"}), "must be strings"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "single turn"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "d.jsonl", [GOOD[0], "", bad, GOOD[1]])
    with pytest.raises(ValueError, match=f"d.jsonl:3: .*{reason}"):
        read_sft_jsonl(path)


def test_jsonl_skip_bad_lines_counts_and_empty_dataset(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{bad", GOOD[0], "[]", GOOD[1], "null"])
    pairs, skipped = read_sft_jsonl(path, skip_bad_lines=True)
    assert len(pairs) == 2 and skipped == 3
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="dataset .*e.jsonl is empty"):
        read_sft_jsonl(tmp_path / "e.jsonl")
    write_lines(tmp_path / "f.jsonl", ["{bad", "[]"])
    with pytest.raises(ValueError, match=r"f.jsonl is empty \(2 malformed lines skipped\)"):
        read_sft_jsonl(tmp_path / "f.jsonl", skip_bad_lines=True)
    (tmp_path / "g.jsonl").write_bytes(GOOD[0].encode() + b"\n\xff\n")
    with pytest.raises(ValueError, match="g.jsonl:2: 'utf-8' codec"):
        read_sft_jsonl(tmp_path / "g.jsonl")
    with pytest.raises(ValueError, match="dataset .*nope.jsonl does not exist"):
        read_sft_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_answer_solution_records_use_the_task_format(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "2*3", "answer": 6, "solution": "2*3=6"})])
    assert read_sft_jsonl(path)[0] == [("2*3", "<think>2*3=6</think><answer>6</answer>")]


def test_check_vocab(tok):
    check_vocab(tok, tok.vocab_size)
    with pytest.raises(ValueError, match=f"tokenizer vocab_size {tok.vocab_size} exceeds the model's vocab_size 256"):
        check_vocab(tok, 256)


def test_right_padding_mask_keeps_pad_id_tokens_inside_a_row():
    """A tokenizer whose pad token is its end-of-turn token (Llama 3: pad = eos = <|eot_id|>) has
    that token inside conversations: those positions are real, only the trailing ones are padding;
    a scored target marks its position real even where the input equals the pad id."""
    from sputnik.data import right_padding_mask

    pad = 9
    ids = torch.tensor([[4, 9, 5, 6, 9, 9], [9, 3, 4, 9, 9, 9], [9, 9, 9, 9, 9, 9]])
    targets = torch.tensor([[-100, 5, 6, -100, -100, -100], [-100, 4, 9, 9, -100, -100], [-100] * 6])
    assert right_padding_mask(ids, pad).int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0] * 6]
    assert right_padding_mask(ids, pad, targets).int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6]
