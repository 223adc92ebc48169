"""Pretraining corpora of any size: sources (txt, JSONL, parquet, saved datasets) -> token shards on
disk (`sputnik data tokenize`) -> memory-mapped packed windows (`sputnik pretrain --data DIR`)."""
