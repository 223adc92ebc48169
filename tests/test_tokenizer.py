"""Tokenizer: exact round trip, special tokens, digit split, chat masks, HF interop; the train stage."""
import argparse
import json
import random

import pytest
import tokenizers

from sputnik.tokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, bytes_per_token, new_backend,
                               train_tokenizer)

WORDS = ["the", "cat", "sat", "on", "mat", "über", "naïve", "中文", "字", "😀", "carry", "sum", "is"]


def corpus(n=300, seed=0):
    """Words, repeated multi-digit numbers (BPE would merge them without the digit split) and chats."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.choice([123, 4567, 89, 1000]), rng.randint(0, 99)
        text = " ".join(rng.choice(WORDS) for _ in range(12))
        docs.append(f"<|user|>What is {a}+{b}?<|assistant|><think>{a}+{b}={a + b}, {text}</think>"
                    f"<answer>{a + b}</answer><|endoftext|>")
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), vocab_size=400)


def random_unicode(rng: random.Random) -> str:
    pools = [
        "abc XYZ 0123456789 +-*/=().,;:!?'\"<>|",
        "\x00\x01\x1b\x7f\t\n\r\x0b\x0c \u00a0\u2028\u3000",
        "\U0001F600\U0001F44D\U0001F3FD\u200d\U0001F469\u200d\U0001F467\U0001F1FA\U0001F1F8",  # emoji, ZWJ, flags
        "e\u0301a\u0308\u0323o\u0338\u20dd",  # combining marks
        "中文字漢字日本語한국어",
        "العربية עברית ٣٤٥ ²³¼",  # RTL, non-ASCII digits and digit-like Latin-1
    ]
    parts = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.15:
            parts.append(rng.choice([" " * rng.randint(1, 6), "\r\n", "\n\n\n", "\t \t"]))
        elif kind < 0.3:  # any scalar value outside the surrogate range
            cp = rng.randint(0, 0x10FFFF)
            parts.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD))
        elif kind < 0.35:
            parts.append(rng.choice(SPECIAL_TOKENS))
        else:
            parts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 8))))
    return "".join(parts)


def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(1234)
    samples = [random_unicode(rng) for _ in range(400)]
    samples += ["", " ", "   ", "\r\n", "\x00", "\x00\x00 \x00", "e\u0301", "👍🏽", "日本", "  leading", "trailing  "]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert [tok.decode(ids) for ids in tok.encode_batch(samples)] == samples


def test_round_trip_hypothesis(tok):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=100, deadline=None)
    @hypothesis.given(st.text())
    def check(s):
        assert tok.decode(tok.encode(s)) == s

    check()


def test_invalid_inputs(tok):
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([5, tok.vocab_size])


def test_special_tokens_are_single_fixed_ids(tok):
    assert [tok.encode(s) for s in SPECIAL_TOKENS] == [[i] for i in range(8)]
    assert (tok.pad_id, tok.eot_id, tok.user_id, tok.assistant_id) == (0, 1, 2, 3)
    assert (tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id) == (4, 5, 6, 7)
    # recognised inside text, and skippable on decode
    ids = tok.encode("x<think>y</think>")
    assert ids[1] == 4 and ids[-1] == 5 and len(ids) == 4
    assert tok.decode(ids, skip_special_tokens=True) == "xy"
    # the trainer never saw the special strings, so no merge contains a piece of one
    pieces = [t for t in tok.backend.get_vocab() if t not in SPECIAL_TOKENS]
    assert not [t for t in pieces if "<|" in t or "think" in t or "endoft" in t]


def test_digits_are_split_individually(tok):
    # "123" and "4567" are in every training document, yet stay one token per digit
    for number in ["123", "4567", "1000"]:
        ids = tok.encode(number)
        assert [tok.decode([i]) for i in ids] == list(number)
    assert len(tok.encode("sum is 4567")) == len(tok.encode("sum is ")) + 4


def test_vocab_size_honoured_and_validated():
    assert train_tokenizer(corpus(), vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="vocab_size=100: must be >= 264"):
        train_tokenizer(corpus(), vocab_size=100)
    with pytest.raises(ValueError, match="no training texts"):
        train_tokenizer([], vocab_size=300)


def test_render_chat_mask_hand_checked(tok):
    d = {c: tok.token_to_id(c) for c in "24+"}
    ids, mask = tok.render_chat("2+2", "<think>4</think><answer>4</answer>")
    assert ids == [2, d["2"], d["+"], d["2"], 3, 4, d["4"], 5, 6, d["4"], 7, 1]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert tok.render_prompt("2+2") == ids[:5]


def test_save_load_and_transformers_parity(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == CHAT_TEMPLATE
    strings = ["What is 123+45?", "<|user|>hi<|assistant|><think>x</think><answer>7</answer><|endoftext|>",
               "naïve 中文 😀\r\n  \x00", "<|pad|><|pad|>"]
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(tmp_path / "tokenizer.json")):
        assert [loaded.encode(s) for s in strings] == [tok.encode(s) for s in strings]
        assert loaded.vocab_size == tok.vocab_size and loaded.eot_id == 1
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert [hf.encode(s) for s in strings] == [tok.encode(s) for s in strings]
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (1, 0, 1)
    prompt, completion = "What is 12+7?", "<think>12+7=19</think><answer>19</answer>"
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    ids, _ = tok.render_chat(prompt, completion)
    assert hf.apply_chat_template(msgs, tokenize=False) == tok.decode(ids)
    assert hf.apply_chat_template(msgs, tokenize=True, return_dict=False) == ids
    assert hf.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True,
                                  return_dict=False) == tok.render_prompt(prompt)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/nope/tokenizer.json does not exist|{tmp_path}/nope does not exist"):
        Tokenizer.load(tmp_path / "nope" / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/tokenizer.json is not a valid"):
        Tokenizer.load(tmp_path)
    foreign = new_backend()
    foreign.train_from_iterator(["hello world"], trainer=tokenizers.trainers.BpeTrainer(vocab_size=300))
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="missing special tokens.*from_pretrained_hf"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained_hf(tmp_path / "missing")


def test_from_pretrained_hf_on_our_files_matches_native(tok, tmp_path):
    pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = Tokenizer.from_pretrained_hf(tmp_path)
    assert (hf.eot_id, hf.pad_id, hf.think_id, hf.answer_end_id) == (1, 0, 4, 7)
    assert hf.vocab_size == tok.vocab_size
    assert hf.render_chat("1+2", "<think>3</think>") == tok.render_chat("1+2", "<think>3</think>")


def test_from_pretrained_hf_without_reasoning_tokens(tmp_path):
    """A foreign HF tokenizer (only an <eos> special, no chat template): tags become plain text."""
    transformers = pytest.importorskip("transformers")
    backend = new_backend()
    backend.train_from_iterator(corpus(50), trainer=tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(str(tmp_path))
    hf = Tokenizer.from_pretrained_hf(tmp_path)
    assert hf.eot_id == hf.pad_id == 0 and hf.think_id is None and hf.user_id is None
    assert hf.render_prompt("hi") == hf.encode("<|user|>hi<|assistant|>")
    ids, mask = hf.render_chat("hi", "<think>ok</think>")
    n_prompt = len(hf.render_prompt("hi"))
    assert ids[-1] == 0 and mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert hf.decode(ids) == "<|user|>hi<|assistant|><think>ok</think><eos>"


def test_bytes_per_token(tok):
    assert bytes_per_token(tok, ["1234"]) == 1.0  # four digits, four tokens
    assert bytes_per_token(tok, ["the cat sat on the mat"]) > 2.0


# ---------------------------------------------------------------------------------------------
# Stage: sputnik tokenizer train
def _text_files(tmp_path, n=6):
    paths = []
    for i, doc in enumerate(corpus(n * 20, seed=7)[::20][:n]):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(doc * 5, encoding="utf-8")
        paths.append(str(p))
    return paths


def test_stage_run_saves_tokenizer_config_and_reports_compression(tmp_path):
    from sputnik.stages.tokenizer import Config, run

    files = _text_files(tmp_path)
    cfg = Config(out_dir=str(tmp_path / "tok"), vocab_size=300, tasks=[], text_files=files)
    result = run(cfg)
    assert result["vocab_size"] == Tokenizer.load(tmp_path / "tok").vocab_size <= 300
    assert result["num_train_docs"] + result["num_held_out_docs"] == 6 and result["num_held_out_docs"] >= 1
    assert result["bytes_per_token_on"] == "held_out" and result["bytes_per_token"] > 1.0
    saved = json.loads((tmp_path / "tok" / "stage_config.json").read_text())
    assert saved["config_class"] == "Config" and saved["vocab_size"] == 300 and saved["text_files"] == files
    assert len(result["run_ids"]) == 1  # its ledger run: the parent of every stage that uses the tokenizer
    rows = [json.loads(l) for l in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in rows} == set(result["run_ids"]) and rows[-1]["status"] == "ok"


def test_stage_config_validation(tmp_path):
    from sputnik.stages.tokenizer import Config

    with pytest.raises(ValueError, match="missing.txt does not exist"):
        Config(text_files=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="empty corpus"):
        Config(tasks=[], text_files=[])
    assert Config().tasks == ["addition", "subtraction", "multiplication", "countdown", "word_problems"]


def test_stage_cli(tmp_path, capsys):
    from sputnik.stages import tokenizer as train_tokenizer

    parser = argparse.ArgumentParser()
    train_tokenizer.register(parser.add_subparsers(dest="command"))
    files = _text_files(tmp_path, 3)
    args = parser.parse_args(["tokenizer", "train", "--out_dir", str(tmp_path / "t"), "--vocab_size", "280",
                              "--tasks", "", "--text_files", ",".join(files)])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] <= 280
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    args = parser.parse_args(["tokenizer", "train", "--vocab_size", "10"])
    with pytest.raises(ValueError, match="vocab_size=10"):
        args.func(args)


def test_stage_with_builtin_tasks(tmp_path):
    from sputnik.stages.tokenizer import Config, run

    result = run(Config(out_dir=str(tmp_path), vocab_size=512, tasks=["addition:max_digits=3", "countdown"],
                        num_examples=40))
    tok = Tokenizer.load(tmp_path)
    assert result["num_held_out_docs"] >= 1 and tok.encode("<think>") == [tok.think_id]


def test_stage_task_specs_project_dir_and_parents(tmp_path):
    """The tokenizer stage reads task specs like every command (knobs shape its corpus), records itself
    in the project_dir's ledger (not beside out_dir) and names the parents it was given."""
    import re

    from sputnik.stages.tokenizer import Config, build_corpus, run

    docs = build_corpus(Config(tasks=["addition:max_digits=2"], num_examples=50))
    prompts = [re.fullmatch(r"What is (\d+) \+ (\d+)\?", d.splitlines()[0]) for d in docs]
    assert len(docs) == 50 and all(m and max(len(m[1]), len(m[2])) <= 2 for m in prompts)
    assert any(max(len(m[1]), len(m[2])) == 2 for m in prompts)

    cfg = Config(out_dir=str(tmp_path / "out" / "tok"), project_dir=str(tmp_path / "proj"), vocab_size=300,
                 tasks=[], text_files=_text_files(tmp_path, 3))
    result = run(cfg, parents=["an-earlier-run"])
    assert not (tmp_path / "out" / "ledger.jsonl").exists()
    rows = [json.loads(line) for line in (tmp_path / "proj" / "ledger.jsonl").read_text().splitlines()]
    assert [(r["event"], r["run_id"], r["parents"]) for r in rows] == [
        ("started", result["run_ids"][0], ["an-earlier-run"]), ("finished", result["run_ids"][0], ["an-earlier-run"])]
    assert rows[0]["command"] == "tokenizer"
