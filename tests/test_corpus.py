"""Streamed corpora (sputnik/corpus/): every source type gives its documents, shards hold exactly the
tokenizer's output per document with exact boundaries, the output does not depend on the number
of workers, a killed run resumes unit by unit, damaged shards are refused naming the file, and
`pretrain --data` trains from memory-mapped shards with the same windows as the in-memory path
and resumes bit for bit."""
import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sputnik.config import build
from sputnik.corpus import shards as S
from sputnik.corpus import sources
from sputnik.corpus import tokenize as T
from sputnik.data import PackedDataset, split_documents, tokenize_documents
from sputnik.stages import pretrain
from sputnik.tokenizer import Tokenizer, train_tokenizer

TINY = dict(architecture="llama", vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
            num_attention_heads=2, num_nextn_predict_layers=0, max_position_embeddings=512)


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["plus", "minus", "is", "the", "sum", "of", "and", "ü", "数", "🙂"]
    return [" ".join(rng.choice(words) if rng.random() < 0.5 else str(rng.randint(0, 999))
                     for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 300 documents as txt files, JSONL, JSONL.gz, parquet (several row groups) and a
    saved `datasets` directory; plus a 300-token tokenizer."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300)
    (root / "txt" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):  # nested: directories are read recursively, in path order
        (root / "txt" / ("sub" if i % 2 else "") / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (root / "docs.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(root / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "docs.parquet", row_group_size=70)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "saved"))
    train_tokenizer(docs, 300).save(root / "tok")
    return root, docs


def txt_order(root: Path) -> list[Path]:
    return sorted((root / "txt").glob("**/*.txt"))


def all_docs(srcs, unit_bytes=1 << 20, text_field="text"):
    return [d for u in sources.list_units([str(s) for s in srcs], unit_bytes, text_field)
            for b in sources.read_unit(u, text_field) for d in b]


def tokenize(root, srcs, out, **over):
    cfg = build(T.Config, {**dict(sources=[str(s) for s in srcs], tokenizer=str(root / "tok"), out_dir=str(out),
                                  eval_fraction=0.1, workers=1, unit_mb=1), **over})
    return T.run(cfg)


# ---------------------------------------------------------------------------------------------
# Sources
@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.parquet", "saved"])
def test_every_source_type_yields_its_documents_in_order(corpus, name):
    root, docs = corpus
    assert all_docs([root / name]) == docs
    # small units cut the source into several pieces and lose or repeat nothing
    assert all_docs([root / name], unit_bytes=2000) == docs


def test_txt_directory_is_one_document_per_file_in_path_order(corpus):
    root, _ = corpus
    expected = [p.read_text(encoding="utf-8") for p in txt_order(root)]
    assert all_docs([root / "txt"], unit_bytes=3000) == expected
    assert len(sources.list_units([str(root / "txt")], 3000)) > 3


def test_a_directory_of_mixed_files_reads_each_by_its_kind(corpus, tmp_path):
    root, docs = corpus
    mixed = tmp_path / "mixed"
    (mixed / "b").mkdir(parents=True)
    (mixed / "a.txt").write_text("one text document")
    os.link(root / "docs.jsonl", mixed / "b" / "part-0.jsonl")
    os.link(root / "docs.parquet", mixed / "b" / "part-1.parquet")
    (mixed / "notes.md").write_text("not a corpus file: skipped")
    assert all_docs([mixed]) == ["one text document"] + docs + docs
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt, .jsonl or .parquet files"):
        sources.list_units([str(tmp_path / "empty")])


def test_jsonl_units_cut_at_line_starts(corpus):
    root, docs = corpus
    units = sources.list_units([str(root / "docs.jsonl")], 1500)
    assert len(units) > 10 and units[0].start == 0 and units[-1].stop == (root / "docs.jsonl").stat().st_size
    data = (root / "docs.jsonl").read_bytes()
    assert all(data[u.start - 1:u.start] == b"\n" for u in units[1:])
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))


def test_bad_sources_are_clear_errors(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(ValueError, match="does not exist"):
        sources.list_units([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        sources.list_units([str(tmp_path / "x.csv")])
    with pytest.raises(ValueError, match="no column 'body'"):
        sources.list_units([str(root / "docs.parquet")], text_field="body")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a string field 'text'"):
        all_docs([bad])
    bad.write_text('{"text": "fine"}\n{"text": "a"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        all_docs([bad])
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        sources.list_units([str(tmp_path / "fake.parquet")])


def test_sample_documents_spreads_over_units_and_stays_bounded(corpus):
    root, docs = corpus
    sample = list(sources.sample_documents([str(root / "docs.jsonl")], 3000))
    assert 0 < sum(map(len, sample)) < 3000 + 2 * max(map(len, docs)) * 20
    assert sample[-1] != docs[0] and set(sample) <= set(docs)
    assert docs[-1] in list(sources.sample_documents([str(root / "docs.jsonl")], 10**9))


# ---------------------------------------------------------------------------------------------
# Shards
def test_shards_hold_the_tokenizers_output_per_document(corpus, tmp_path):
    root, docs = corpus
    tok = Tokenizer.load(root / "tok")
    out = tmp_path / "shards"
    totals = tokenize(root, [root / "docs.jsonl"], out)
    train_docs, held_docs = split_documents(docs, 0.1)
    for split, expected in (("train", train_docs), ("heldout", held_docs)):
        stream = S.TokenShards(out, split, tok.vocab_size)
        assert stream.num_documents == len(expected)
        for i, d in enumerate(expected):  # boundaries exact: document i is its tokens and one <|endoftext|>
            assert stream.document(i).tolist() == tok.encode(d) + [tok.eot_id]
        # the whole stream is the in-memory path's stream
        assert torch.equal(torch.from_numpy(stream.read(0, len(stream))), tokenize_documents(expected, tok).long())
    assert totals["documents"] == len(docs) and totals["train_tokens"] + totals["heldout_tokens"] == sum(
        len(tok.encode(d)) + 1 for d in docs)
    manifest = S.read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["sha256"] == S.tokenizer_fingerprint(tok)
    assert S.token_dtype(70000) is np.uint32


def test_reads_across_shard_boundaries(corpus, tmp_path):
    root, docs = corpus
    tok = Tokenizer.load(root / "tok")
    # several units: a jsonl cut small, so the stream spans many shards
    cfg = build(T.Config, dict(sources=[str(root / "docs.jsonl")], tokenizer=str(root / "tok"), out_dir=str(tmp_path / "s"),
                               eval_fraction=0.0, workers=1, unit_mb=1))
    units = sources.list_units(cfg.sources, 2000)
    for i, u in enumerate(units):
        S.write_unit(tmp_path / "s", i, sources.read_unit(u), tok, 0.0)
    manifest = T.manifest_for(cfg, tok, units)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    stream = S.TokenShards(tmp_path / "s", "train", tok.vocab_size)
    assert len(stream.files) == len(units) > 10
    whole = tokenize_documents(docs, tok).long().numpy()
    rng = np.random.default_rng(0)
    for a in rng.integers(0, len(whole) - 300, 50):
        assert np.array_equal(stream.read(int(a), int(a) + 257), whole[a:a + 257])


def test_output_does_not_depend_on_the_number_of_workers(corpus, tmp_path):
    root, _ = corpus
    srcs = [root / "docs.jsonl", root / "txt", root / "docs.parquet"]
    cfg = dict(sources=[str(s) for s in srcs], tokenizer=str(root / "tok"), eval_fraction=0.1, unit_mb=1)
    T.run(build(T.Config, dict(cfg, out_dir=str(tmp_path / "one"), workers=1)))
    T.run(build(T.Config, dict(cfg, out_dir=str(tmp_path / "two"), workers=2)))
    files = lambda d: sorted(p.name for p in (d / "shards").iterdir())  # noqa: E731
    # 7 units (the jsonl, the txt directory, 5 parquet row groups) of 5 files each
    assert files(tmp_path / "one") == files(tmp_path / "two") and len(files(tmp_path / "one")) == 7 * 5
    for name in files(tmp_path / "one"):
        a, b = (tmp_path / "one" / "shards" / name).read_bytes(), (tmp_path / "two" / "shards" / name).read_bytes()
        if name.endswith(".json"):
            a, b = json.loads(a), json.loads(b)
        assert a == b, name


def test_killed_run_resumes_unit_by_unit(corpus, tmp_path, monkeypatch):
    root, docs = corpus
    out = tmp_path / "s"
    srcs = [root / "docs.jsonl", root / "docs.parquet"]
    tokenize(root, srcs, tmp_path / "ref")
    # a run killed inside its second unit: the first is finished, the second left temp files only
    real, calls = S.write_unit, []

    def dying(out_dir, index, batches, tokenizer, eval_fraction, describe=""):
        calls.append(index)
        if index == 1:
            writer = S._SplitWriter(Path(out_dir), index, "train", np.uint16)
            writer.add([[1, 2, 3]])
            raise KeyboardInterrupt  # as a kill: the temp file stays (no abort on SIGKILL)
        return real(out_dir, index, batches, tokenizer, eval_fraction, describe)

    monkeypatch.setattr(S, "write_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        tokenize(root, srcs, out)
    monkeypatch.setattr(S, "write_unit", real)
    assert S.read_marker(out, 0) is not None and S.read_marker(out, 1) is None
    with pytest.raises(ValueError, match="unit 1 of 6 was never finished"):
        S.TokenShards(out)
    resumed = tokenize(root, srcs, out)
    assert resumed["documents"] == 2 * len(docs)
    for p in (tmp_path / "ref" / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes() or p.suffix == ".json"
    # a second run over finished shards writes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if not p.name.startswith(".")}
    tokenize(root, srcs, out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if not p.name.startswith(".")} == before


def test_damaged_shards_are_refused_naming_the_file(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "s"
    tokenize(root, [root / "docs.jsonl"], out)
    vocab = Tokenizer.load(root / "tok").vocab_size
    bin_ = out / "shards" / "00000.train.bin"
    data = bin_.read_bytes()
    bin_.write_bytes(data[:-6])  # truncated
    with pytest.raises(ValueError, match=r"00000\.train\.bin has \d+ bytes, expected \d+.*truncated"):
        S.TokenShards(out, "train", vocab)
    corrupt = bytearray(data)
    corrupt[100:102] = np.array([65000], dtype=np.uint16).tobytes()  # an id no 300-token vocabulary has
    bin_.write_bytes(bytes(corrupt))
    stream = S.TokenShards(out, "train", vocab)
    with pytest.raises(ValueError, match=r"00000\.train\.bin: token id 65000 >= the vocabulary"):
        stream.read(0, 200)
    bin_.write_bytes(data)
    (out / "shards" / "00000.train.idx").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"00000\.train\.idx: unreadable document index"):
        S.TokenShards(out, "train", vocab)
    with pytest.raises(ValueError, match="not a shard directory"):
        S.TokenShards(tmp_path)


def test_another_tokenization_into_the_same_directory_is_refused(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "s"
    tokenize(root, [root / "docs.jsonl"], out)
    with pytest.raises(ValueError, match="holds shards of another tokenization .*eval_fraction"):
        tokenize(root, [root / "docs.jsonl"], out, eval_fraction=0.2)
    with pytest.raises(ValueError, match="holds shards of another tokenization .*sources"):
        tokenize(root, [root / "docs.parquet"], out)


# ---------------------------------------------------------------------------------------------
# Pretraining from shards
def pre_cfg(root, out, data, **over):
    values = dict(out_dir=str(out), tokenizer=str(root / "tok"), data=str(data), tasks=[], model=TINY,
                  seq_len=32, batch_size=4, steps=8, eval_every=4, eval_batches=2, checkpoint_every=4, keep_last=5,
                  log_every=1, num_threads=1, progress=False, optim={"lr": 3e-3, "warmup_steps": 2})
    return build(pretrain.Config, {**values, **over})


def test_packed_windows_from_shards_equal_the_in_memory_ones(corpus, tmp_path):
    root, docs = corpus
    tok = Tokenizer.load(root / "tok")
    tokenize(root, [root / "docs.jsonl", root / "txt"], tmp_path / "s")
    stream = S.TokenShards(tmp_path / "s", "train", tok.vocab_size)
    memory = torch.from_numpy(stream.read(0, len(stream)))
    a, b = PackedDataset(stream, 4, 32, seed=3), PackedDataset(memory, 4, 32, seed=3)
    for _ in range(30):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.dtype == torch.long and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_pretrain_from_shards_trains_and_resumes_bit_exactly(corpus, tmp_path):
    root, _ = corpus
    tokenize(root, [root / "docs.jsonl", root / "docs.parquet"], tmp_path / "s")
    full = pretrain.run(pre_cfg(root, tmp_path / "full", tmp_path / "s"))
    metrics = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert evals[-1] < evals[0] and full["steps"] == 8
    part = tmp_path / "part"
    part.mkdir()
    os.system(f"cp -r {tmp_path}/full/checkpoints {tmp_path}/full/metrics.jsonl {part}/")
    os.system(f"rm -rf {part}/checkpoints/ckpt-000008")
    pretrain.run(pre_cfg(root, part, tmp_path / "s", resume="auto"))
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "ckpt-000008" / "model.safetensors")
    b = load_file(part / "checkpoints" / "ckpt-000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_refuses_shards_of_another_tokenizer_and_both_inputs(corpus, tmp_path):
    root, docs = corpus
    tokenize(root, [root / "docs.jsonl"], tmp_path / "s")
    train_tokenizer(docs[:100], 280).save(tmp_path / "other")
    with pytest.raises(ValueError, match="tokenized with another tokenizer"):
        pretrain.run(pre_cfg(root, tmp_path / "o", tmp_path / "s", tokenizer=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="data and texts: give one"):
        pre_cfg(root, tmp_path / "o", tmp_path / "s", texts=[str(root / "txt")])


def test_cli_tokenize_then_tokenizer_sample(corpus, tmp_path):
    from sputnik.cli import main
    from sputnik.stages import tokenizer as tok_stage

    root, _ = corpus
    assert main(["data", "tokenize", "--sources", f"{root / 'docs.jsonl'},{root / 'saved'}", "--tokenizer",
                 str(root / "tok"), "--out_dir", str(tmp_path / "s"), "--workers", "1"]) == 0
    assert S.TokenShards(tmp_path / "s").num_documents > 500
    ledger = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [r["event"] for r in ledger] == ["started", "finished"] and ledger[0]["command"] == "data tokenize"
    assert ledger[1]["status"] == "ok"
    # the tokenizer stage fits on a sample of the same sources
    result = tok_stage.run(build(tok_stage.Config, dict(out_dir=str(tmp_path / "tok2"), vocab_size=300, tasks=[],
                                                        corpus=[str(root / "docs.parquet")], corpus_sample_mb=1)))
    assert result["num_train_docs"] > 200 and result["vocab_size"] <= 300


# ---------------------------------------------------------------------------------------------
# The diverse corpus generator
def generate(out, **over):
    from sputnik.corpus import generate as G

    return G.run(build(G.Config, {**dict(out_dir=str(out), mb=1, file_mb=1, workers=1,
                                         tasks=["addition", "rg:chain_sum", "word_problems"]), **over}))


def test_generated_corpus_is_deterministic_and_train_split_only(tmp_path):
    """Same bytes with one worker and two: the gym sources include one that draws from the global
    `random` (list_functions) and one that iterates sets of strings (isomorphic_strings: its order
    follows the process's hash salt), both once different in every run."""
    from sputnik.tasks.base import split_of

    tasks = ["addition", "rg:chain_sum", "word_problems", "rg:list_functions", "rg:isomorphic_strings"]
    generate(tmp_path / "a", mb=2, tasks=tasks)
    generate(tmp_path / "b", mb=2, workers=2, tasks=tasks)
    names = sorted(p.name for p in (tmp_path / "a").glob("part-*.jsonl"))
    assert names == ["part-00000.jsonl", "part-00001.jsonl"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    records = [json.loads(x) for n in names for x in (tmp_path / "a" / n).read_text().splitlines()]
    assert {r["source"] for r in records} == set(tasks)
    assert 1_900_000 < sum(len(r["text"].encode()) for r in records) < 2_100_000
    questions = [ex.split("\nAnswer: ")[0] for r in records if r["source"] == "rg:chain_sum" for ex in r["text"].split("\n\n")]
    assert len(questions) > 1000 and all(split_of(q) == "train" for q in questions)  # held-out problems never written
    # another seed is another corpus
    generate(tmp_path / "c", mb=1, seed=1, tasks=tasks)
    assert (tmp_path / "c" / names[0]).read_bytes() != (tmp_path / "a" / names[0]).read_bytes()


def test_generate_resumes_and_refuses_other_settings(tmp_path):
    generate(tmp_path / "a", mb=2)
    first = (tmp_path / "a" / "part-00000.jsonl").stat().st_mtime_ns
    (tmp_path / "a" / "part-00001.jsonl").unlink()  # as if killed before the second file was renamed
    generate(tmp_path / "a", mb=2)
    assert (tmp_path / "a" / "part-00000.jsonl").stat().st_mtime_ns == first
    assert (tmp_path / "a" / "part-00001.jsonl").is_file()
    with pytest.raises(ValueError, match="generated with other settings .*seed"):
        generate(tmp_path / "a", mb=2, seed=5)
    with pytest.raises(ValueError, match="nosuchtask"):
        generate(tmp_path / "b", tasks=["nosuchtask"])


def test_the_diverse_preset_generates_and_tokenizes(tmp_path):
    from sputnik.tasks import PRESETS

    assert len(PRESETS["diverse"]) >= 60
    generate(tmp_path / "c", tasks=["@diverse"], examples_per_doc=2)
    records = [json.loads(x) for x in (tmp_path / "c" / "part-00000.jsonl").read_text().splitlines()]
    assert len({r["source"] for r in records}) == len(PRESETS["diverse"])  # every source is used
    train_tokenizer([r["text"] for r in records[:200]], 400).save(tmp_path / "tok")
    out = T.run(build(T.Config, dict(sources=[str(tmp_path / "c")], tokenizer=str(tmp_path / "tok"),
                                     out_dir=str(tmp_path / "s"), workers=1)))
    assert out["documents"] == len(records)
