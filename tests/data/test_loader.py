import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.data.loader import TokenDataset
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.errors import UserError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i))
    cfg = PrepareConfig(
        source=str(corpus), out=str(root / "out"), tokenizer="byte", val_fraction=0.2, shard_tokens=700
    )
    return prepare(cfg)


def all_tokens(directory: Path, split: str) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text())
    shards = meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(directory / s["file"], dtype="<u2") for s in shards]).astype(np.int64)


def test_opens_with_meta(prepared):
    ds = TokenDataset(prepared)
    assert len(ds.shards) > 3  # several shards, so windows cross boundaries
    assert (ds.vocab_size, ds.eos_id, ds.pad_id) == (258, 256, 257)
    assert ds.n_tokens == len(all_tokens(prepared, "train")) == ds.meta["splits"]["train"]["tokens"]
    assert ds.tokenizer().decode(ds.window(0, 9).tolist()) == "document "


def test_windows_cross_shard_boundaries(prepared):
    ds = TokenDataset(prepared)
    tokens = all_tokens(prepared, "train")
    for index in [0, 695, 699, 700, 701, 1399, ds.n_tokens - 50]:
        assert np.array_equal(ds.window(index, 50), tokens[index : index + 50])
    assert np.array_equal(ds.window(0, ds.n_tokens), tokens)
    with pytest.raises(IndexError):
        ds.window(ds.n_tokens - 5, 6)


def test_batches_depend_only_on_seed_and_step(prepared):
    ds = TokenDataset(prepared)
    a = ds.batch_for(seed=3, step=7, global_batch=8, seq_len=33, row_start=0, row_end=8)
    b = TokenDataset(prepared).batch_for(seed=3, step=7, global_batch=8, seq_len=33, row_start=0, row_end=8)
    assert a.dtype == torch.int64 and a.shape == (8, 33)
    assert torch.equal(a, b)
    assert not torch.equal(
        a, ds.batch_for(seed=3, step=8, global_batch=8, seq_len=33, row_start=0, row_end=8)
    )
    assert not torch.equal(
        a, ds.batch_for(seed=4, step=7, global_batch=8, seq_len=33, row_start=0, row_end=8)
    )
    tokens = all_tokens(prepared, "train")
    starts = ds.global_batch_starts(3, 7, 8, 33)
    assert starts.min() >= 0 and starts.max() <= ds.n_tokens - 33
    for row, start in zip(a, starts, strict=True):
        assert np.array_equal(row.numpy(), tokens[start : start + 33])


def test_rank_and_micro_slices_make_the_global_batch(prepared):
    ds = TokenDataset(prepared)
    full = ds.batch_for(seed=1, step=5, global_batch=12, seq_len=17, row_start=0, row_end=12)
    for world_size, grad_accum in [(1, 1), (2, 3), (3, 2), (4, 1), (1, 4)]:
        batch_size = 12 // (world_size * grad_accum)
        parts = [
            ds.random_windows(
                seed=1,
                step=5,
                batch_size=batch_size,
                seq_len=17,
                rank=rank,
                world_size=world_size,
                micro_step=micro,
                grad_accum=grad_accum,
            )
            for micro in range(grad_accum)
            for rank in range(world_size)
        ]
        assert all(p.shape == (batch_size, 17) for p in parts)
        assert torch.equal(torch.cat(parts), full)


def test_eval_windows(prepared):
    ds = TokenDataset(prepared, "val")
    tokens = all_tokens(prepared, "val")
    windows = torch.cat(list(ds.eval_windows(seq_len=20, batch_size=4)))
    assert windows.shape == (ds.n_tokens // 20, 20)
    assert np.array_equal(windows.numpy().reshape(-1), tokens[: len(windows) * 20])
    some = torch.cat(list(ds.eval_windows(seq_len=20, max_windows=5, batch_size=2)))
    assert some.shape == (5, 20) and torch.equal(some[0], windows[0]) and torch.equal(some[-1], windows[-1])
    assert torch.equal(some, torch.cat(list(ds.eval_windows(seq_len=20, max_windows=5))))
    ranks = [torch.cat(list(ds.eval_windows(20, 5, rank=r, world_size=2))) for r in range(2)]
    assert sorted(map(tuple, torch.cat(ranks).tolist())) == sorted(map(tuple, some.tolist()))


def test_too_short_for_seq_len(prepared):
    ds = TokenDataset(prepared, "val")
    with pytest.raises(UserError, match=f"has {ds.n_tokens} tokens"):
        ds.random_windows(seed=0, step=0, batch_size=1, seq_len=ds.n_tokens)
    assert ds.random_windows(seed=0, step=0, batch_size=1, seq_len=ds.n_tokens - 1).shape == (
        1,
        ds.n_tokens - 1,
    )


def test_open_errors(prepared, tmp_path):
    with pytest.raises(UserError, match=r"meta\.json is missing"):
        TokenDataset(tmp_path)
    with pytest.raises(UserError, match="no 'test' split"):
        TokenDataset(prepared, "test")


def test_validate_ids_names_bad_id(prepared, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in prepared.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    shard = copy / "train_00001.bin"
    ids = np.fromfile(shard, dtype="<u2")
    ids[3] = 9999
    ids.tofile(shard)
    with pytest.raises(UserError, match=r"train_00001\.bin has token id 9999 at position 3"):
        TokenDataset(copy)


@pytest.mark.parametrize("n_tokens, seq_len, count", [(1000, 20, None), (1000, 20, 7), (63, 8, 3), (8, 8, 1)])
def test_eval_window_starts_are_even_and_non_overlapping(n_tokens, seq_len, count):
    from multitoken.data.loader import eval_window_starts

    starts_W = eval_window_starts(n_tokens, seq_len, count)
    available = n_tokens // seq_len
    assert len(starts_W) == (available if count is None else min(count, available))
    assert starts_W[0] == 0 and all(s % seq_len == 0 for s in starts_W)
    assert all(b - a >= seq_len for a, b in itertools.pairwise(starts_W))
    assert len(starts_W) == 1 or starts_W[-1] == (available - 1) * seq_len


def test_study_windows_are_the_datasets_eval_windows(prepared):
    """The studies score the same windows the trainer validates on (one formula, not two copies)."""
    from multitoken.data.loader import eval_window_starts
    from multitoken.studies.scoring import windows

    ds = TokenDataset(prepared, "train")
    stream_S = torch.from_numpy(ds.window(0, ds.n_tokens))
    for count in (None, 5):
        tokens_WT, starts = windows(stream_S, 20, count)
        assert torch.equal(tokens_WT, torch.cat(list(ds.eval_windows(20, count))))
        assert starts == [int(s) for s in eval_window_starts(ds.n_tokens, 20, count)]
