"""Corpora, tokenized shards and batch sampling: `sources` -> `shards.prepare` -> `loader.TokenDataset`."""
