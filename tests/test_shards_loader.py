"""Streaming loader: splits, rank/worker coverage, equal batch counts, determinism, resume, dedup."""

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
import webdataset as wds

from transrec.errors import DataError
from transrec.shards.batch import (
    IMAGE,
    PAD,
    TEXT,
    ArrayContent,
    Batch,
    ImageContent,
    TextContent,
    map_tensors,
    tensor_fields,
)
from transrec.shards.dataset import Dataset
from transrec.shards.format import DatasetWriter
from transrec.shards.loader import SequenceLoader, pack_batch, unpack_batch
from transrec.shards.synth import synthesize


def make_world(root):
    """A tiny synthetic dataset (130 users of 1-12 items) with 7 sequence shards of uneven eval
    counts, and random content: (dataset, content)."""
    path = synthesize(root / "src", domain="source", n_users=130, n_items=70,
                      min_len=1, max_len=12, seed=3, seq_shard_size=20)
    ds = Dataset.open(path)
    rng = np.random.default_rng(0)
    mod = ds.modality
    n_t, n_i = int((mod == TEXT).sum()), int((mod == IMAGE).sum())
    row = np.zeros(ds.n_items, np.int64)
    row[mod == TEXT] = np.arange(n_t)
    row[mod == IMAGE] = np.arange(n_i)
    content = ArrayContent(mod, row, rng.integers(1, 1000, (n_t, 9)).astype(np.int32),
                           rng.integers(1, 10, n_t).astype(np.int32),
                           rng.integers(0, 256, (n_i, 3, 4, 4)).astype(np.uint8))
    return ds, content


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("w"))


def raw_sequences(ds):
    """user index -> item index array, read straight from the shards."""
    out = {}
    for s in wds.WebDataset([str(p.path) for p in ds.seq_shards], shardshuffle=False, empty_check=False):
        obj = json.loads(s["json"])
        out[obj["index"]] = np.array([ds.item_index[k] for k in obj["items"]])
    return out


def rows_of(batches, valid_only=True):
    out = []
    for b in batches:
        keep = b.row_valid if b.row_valid is not None else torch.ones(b.batch_size, dtype=torch.bool)
        for r in range(b.batch_size):
            if keep[r] or not valid_only:
                out.append((int(b.users[r]), tuple(int(x) for x in b.seq[r][b.mask[r]])))
    return out


def test_leave_one_out_windows(world):
    ds, content = world
    seqs = raw_sequences(ds)
    max_len = 5
    for split in ("train", "valid", "test"):
        loader = SequenceLoader(ds, content, split=split, batch_size=16, max_len=max_len)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert b.seq.shape == (16, max_len + 1)
            assert torch.equal(b.mask, b.seq != PAD)
            # right-aligned: once valid, valid to the end
            assert torch.all(b.mask[:, 1:] >= b.mask[:, :-1])
        for user, window in rows_of(batches):
            s = seqs[user]
            if split == "train":
                part = s[:-2] if len(s) >= 3 else s
                assert len(part) >= 2
                assert window == tuple(part[-(max_len + 1):])
            else:
                assert len(s) >= 3
                end = len(s) - 1 if split == "valid" else len(s)
                assert window == tuple(s[:end][-(max_len + 1):])
        if split != "train":
            b = batches[0]
            for r in range(b.batch_size):
                s = seqs[int(b.users[r])]
                end = len(s) - 1 if split == "valid" else len(s)
                hist = sorted(b.hist_items[b.hist_rows == r].tolist())
                target = s[end - 1]
                assert hist == sorted(x for x in s[:end - 1] if x != target)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_two_ranks_cover_every_eval_user_once(world, split):
    ds, content = world
    n_eval = sum(s.n_eval for s in ds.seq_shards)
    loaders = [SequenceLoader(ds, content, split=split, batch_size=8, max_len=6, rank=r, world_size=2)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
    users = [u for batches in per_rank for u, _ in rows_of(batches)]
    assert len(users) == len(set(users)) == n_eval


@pytest.mark.parametrize("policy", ["repeat", "drop"])
def test_two_ranks_train_equal_batches(world, policy):
    ds, content = world
    n_train = sum(s.n_train for s in ds.seq_shards)
    for epoch in (0, 1):
        loaders = [SequenceLoader(ds, content, batch_size=8, max_len=6, rank=r, world_size=2, policy=policy)
                   for r in range(2)]
        for ld in loaders:
            ld.set_epoch(epoch)
        per_rank = [list(ld) for ld in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) > 0
        rows = [row for batches in per_rank for row in rows_of(batches)]
        users = [u for u, _ in rows]
        # users never cross ranks within an epoch
        r0 = {u for u, _ in rows_of(per_rank[0])}
        r1 = {u for u, _ in rows_of(per_rank[1])}
        assert not r0 & r1
        if policy == "repeat":
            assert len(set(users)) == n_train  # every training user at least once
        else:
            assert len(users) == len(set(users))  # nobody twice


def test_workers_cover_and_match_len(world):
    ds, content = world
    ld = SequenceLoader(ds, content, split="test", batch_size=8, max_len=6, num_workers=2)
    assert ld.effective_workers == 2
    batches = list(ld)
    assert len(batches) == len(ld)
    users = [u for u, _ in rows_of(batches)]
    assert len(users) == len(set(users)) == sum(s.n_eval for s in ds.seq_shards)
    assert [b.cursor for b in batches] == [8 * (i + 1) for i in range(len(batches))]
    assert ld.stats.total == 0


def _key(batches):
    return [(b.seq.numpy().tobytes(), b.users.numpy().tobytes(), b.cursor) for b in batches]


def test_order_is_a_function_of_seed_and_epoch(world):
    ds, content = world
    a = SequenceLoader(ds, content, batch_size=8, max_len=6, seed=5)
    b = SequenceLoader(ds, content, batch_size=8, max_len=6, seed=5)
    e0 = _key(list(a))
    assert e0 == _key(list(b))
    a.set_epoch(1)
    assert _key(list(a)) != e0
    c = SequenceLoader(ds, content, batch_size=8, max_len=6, seed=6)
    assert _key(list(c)) != e0


@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (2, 1), (0, 2)])
def test_resume_from_cursor_reproduces_remaining_batches(world, num_workers, world_size):
    ds, content = world
    kw = dict(batch_size=4, max_len=6, seed=1, num_workers=num_workers, world_size=world_size)
    full = SequenceLoader(ds, content, **kw)
    full.set_epoch(2)
    ref = list(full)
    for k in (0, 1, 3, len(ref) - 1):
        cur = ref[k - 1].cursor if k else 0
        resumed = SequenceLoader(ds, content, start_cursor=cur, **kw)
        resumed.set_epoch(2)
        assert _key(list(resumed)) == _key(ref[k:])
        # later epochs start from the beginning again
        resumed.set_epoch(3)
        assert len(list(resumed)) == len(ref)
    with pytest.raises(ValueError, match="multiple"):
        SequenceLoader(ds, content, start_cursor=3, **kw)


def test_dedup_content_equals_per_position_content(world):
    ds, content = world
    batch = next(iter(SequenceLoader(ds, content, batch_size=32, max_len=8)))
    assert batch.num_unique < int(batch.mask.sum())  # the small world repeats items within a batch
    assert torch.equal(batch.unique_items, torch.unique(batch.seq[batch.mask]))
    assert torch.equal(batch.unique_items[batch.inverse[batch.mask]], batch.seq[batch.mask])
    assert torch.allclose(batch.unique_log_q, torch.from_numpy(ds.log_q)[batch.unique_items])
    covered = torch.cat([batch.text.index, batch.image.index]).sort().values
    assert torch.equal(covered, torch.arange(batch.num_unique))
    # content of each valid position, gathered naively one item at a time
    for b, pos in zip(*torch.nonzero(batch.mask, as_tuple=True)):
        item = int(batch.seq[b, pos])
        u = int(batch.inverse[b, pos])
        if content.modality[item] == TEXT:
            r = int((batch.text.index == u).nonzero())
            n = int(content.lengths[content.row[item]])
            assert batch.text.input_ids[r, :n].tolist() == content.tokens[content.row[item], :n].tolist()
            assert int(batch.text.attention_mask[r].sum()) == n
        else:
            r = int((batch.image.index == u).nonzero())
            assert np.array_equal(batch.image.pixels[r].numpy(), content.images[content.row[item]])


def test_too_few_shards_for_ranks_is_one_line_error(tmp_path, world):
    _, content = world
    w = DatasetWriter(tmp_path / "one", shard_size=100)
    w.add_item("a", title="red shoe")
    w.add_item("b", title="blue hat")
    w.add_sequence("u", ["a", "b"])
    w.close()
    ds = Dataset.open(tmp_path / "one")
    c = ArrayContent(ds.modality, np.arange(2), np.ones((2, 3), np.int32), np.ones(2, np.int32), None)
    with pytest.raises(DataError, match="1 sequence shards for 2 ranks"):
        SequenceLoader(ds, c, batch_size=2, max_len=3, rank=0, world_size=2)
    with pytest.raises(DataError, match="content source has"):
        SequenceLoader(ds, content, batch_size=2, max_len=3)


def _every_field_batch() -> Batch:
    """A batch with every field of every batch dataclass set (odd dtypes and shapes included)."""
    g = torch.Generator().manual_seed(0)
    text = TextContent(torch.randint(0, 99, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.int64),
                       torch.tensor([0, 2, 4]), torch.randn(3, 5, 7, generator=g).to(torch.bfloat16))
    image = ImageContent(torch.randint(0, 255, (2, 3, 4, 4), generator=g, dtype=torch.uint8),
                         torch.tensor([1, 3]), torch.randn(2, 6, 2, 2, generator=g).to(torch.float16))
    seq = torch.tensor([[PAD, 1, 2], [3, 4, 5]])
    return Batch(seq=seq, mask=seq != PAD, inverse=torch.tensor([[0, 0, 1], [2, 3, 4]]),
                 unique_items=torch.arange(1, 6), unique_log_q=torch.randn(5, generator=g),
                 users=torch.tensor([7, 9]), text=text, image=image, hist_rows=torch.tensor([0, 1, 1]),
                 hist_items=torch.tensor([1, 3, 4]), cursor=12, row_valid=torch.tensor([True, False]))


def test_pack_unpack_round_trips_every_field():
    batch = _every_field_batch()
    for obj in (batch, batch.text, batch.image):  # the sample sets every field, so none goes untested
        unset = [f.name for f in fields(obj) if getattr(obj, f.name) is None]
        assert not unset, f"{type(obj).__name__} fields left unset in the sample: {unset}"
    buf, skeleton = pack_batch(batch)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    got = unpack_batch(buf, skeleton)
    assert got.cursor == batch.cursor
    want = dict(tensor_fields(batch))
    have = dict(tensor_fields(got))
    assert sorted(have) == sorted(want)
    assert {"text.prefix", "image.prefix", "hist_rows", "hist_items", "row_valid"} <= set(have)
    for name, t in want.items():
        assert have[name].dtype == t.dtype and have[name].shape == t.shape, name
        assert torch.equal(have[name], t), name
    # absent content round-trips as absent
    bare = unpack_batch(*pack_batch(Batch(seq=batch.seq, mask=batch.mask, inverse=batch.inverse,
                                          unique_items=batch.unique_items,
                                          unique_log_q=batch.unique_log_q, users=batch.users)))
    assert bare.text is None and bare.image is None and bare.hist_rows is None and bare.row_valid is None


def test_batch_to_moves_every_field():
    batch = _every_field_batch()
    moved = batch.to(torch.float64)  # a dtype stands in for a device: every tensor must pass through
    for name, t in tensor_fields(moved):
        assert t.dtype == torch.float64, name
    assert moved.cursor == batch.cursor
    seen = []
    map_tensors(batch, lambda t: seen.append(t) or t)
    assert len(seen) == len(dict(tensor_fields(batch))) == 16


def test_workers_carry_the_frozen_prefix_activations(world):
    """Batches that cross from DataLoader workers keep every field a wrapped content source fills."""
    ds, content = world

    class WithPrefix:
        n_items, modality = content.n_items, content.modality

        def gather(self, items):
            text, image = content.gather(items)
            if text is not None:
                text.prefix = text.input_ids[..., None].to(torch.bfloat16).repeat(1, 1, 3)
            if image is not None:
                image.prefix = image.pixels.float()[:, :2] + 0.5
            return text, image

    src = WithPrefix()
    for workers in (0, 2):
        ld = SequenceLoader(ds, src, split="train", batch_size=8, max_len=5, num_workers=workers)
        n = 0
        for b in ld:
            n += 1
            assert b.text is not None and b.text.prefix is not None
            assert torch.equal(b.text.prefix[..., 0], b.text.input_ids.to(torch.bfloat16))
            assert b.image is not None and b.image.prefix is not None
            assert torch.equal(b.image.prefix, b.image.pixels.float()[:, :2] + 0.5)
            if n == 4:
                break
        assert n == 4
