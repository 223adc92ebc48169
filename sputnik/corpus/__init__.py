"""Pretraining corpora of any size: sources (txt, JSONL, parquet, saved datasets) -> token shards on
disk (`sputnik data tokenize`) -> packed windows read from disk (`sputnik pretrain --data DIR`)."""
