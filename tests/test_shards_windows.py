"""Training windows (data.windows): the windows of a training part, the loader's exact counts, and
determinism, resume, workers and two ranks under every mode; "last" unchanged."""

import hashlib
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from test_shards_loader import make_world

from transrec.config import build_config, set_key, validate
from transrec.engine.data import epoch_facts, epoch_line
from transrec.errors import ConfigError, DataError
from transrec.shards import windows as W
from transrec.shards.dataset import Dataset
from transrec.shards.loader import SequenceLoader


def expected(part, m, mode):
    """The windows of ``part`` written out from the definitions, independently of the module."""
    n = len(part)
    if n < 2:
        return []
    if mode == "last":
        return [tuple(part[-(m + 1):])]
    if mode == "prefixes":
        return [tuple(part[max(0, t - m):t + 1]) for t in range(1, n)]
    out, e = [], n
    while e >= 2:
        out.append(tuple(part[max(0, e - m - 1):e]))
        e -= m
    return out[::-1]


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_windows_of_a_part(m):
    for n in range(0, 14):
        part = np.arange(100, 100 + n)  # distinct items: a target names its position
        for mode in W.WINDOWS:
            got = [tuple(w) for w in W.train_windows(part, m, mode)]
            assert got == expected(part, m, mode)
            assert len(got) == W.window_count(n, m, mode)
            assert all(2 <= len(w) <= m + 1 for w in got)
        if n < 2:
            continue
        sl = W.train_windows(part, m, "sliding")
        targets = [x for w in sl for x in w[1:]]
        assert targets == part[1:].tolist()  # every item after the first a target, once, in order
        assert sl[-1][-1] == part[-1] and sl[0][0] == part[0]
        assert all(a[-1] == b[0] for a, b in zip(sl, sl[1:]))  # consecutive windows share one item
        assert all(len(w) == m + 1 for w in sl[1:])  # only the earliest may be short
        pre = W.train_windows(part, m, "prefixes")
        assert [w[-1] for w in pre] == part[1:].tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The loader tests' synthetic world: 130 users of 1-12 items in 7 sequence shards."""
    ds, content = make_world(tmp_path_factory.mktemp("w"))
    parts = {}
    for s in wds.WebDataset([str(p.path) for p in ds.seq_shards], shardshuffle=False, empty_check=False):
        obj = json.loads(s["json"])
        items = np.array([ds.item_index[k] for k in obj["items"]])
        parts[obj["index"]] = items[:-2] if len(items) >= 3 else items
    return ds, content, parts


def rows(batches):
    return [(int(b.users[r]), tuple(int(x) for x in b.seq[r][b.mask[r]]))
            for b in batches for r in range(b.batch_size)]


def digest(loader):
    h = hashlib.sha256()
    for b in loader:
        h.update(b.users.numpy().tobytes())
        h.update(b.seq.numpy().tobytes())
        h.update(str(b.cursor).encode())
    return h.hexdigest()[:16]


# (loader settings, epoch, len(loader), digest of the batch stream) recorded from the loader before
# data.windows existed
LAST_STREAMS = [
    (dict(seed=5), 1, 14, "3a3f3db5cf4c9ded"),
    (dict(seed=2, num_workers=2), 0, 18, "a9e9fdf96586b312"),
    (dict(seed=1, world_size=2, rank=1), 3, 9, "7d65fd504a717a21"),
    (dict(seed=0, policy="drop", world_size=2, rank=0), 0, 4, "653ec791dd960d48"),
]


@pytest.mark.parametrize("kw,epoch,n,want", LAST_STREAMS)
def test_last_is_the_batch_stream_of_before(world, kw, epoch, n, want):
    ds, content, _ = world
    ld = SequenceLoader(ds, content, batch_size=8, max_len=6, windows="last", **kw)
    ld.set_epoch(epoch)
    assert len(ld) == n
    assert digest(ld) == want
    assert ld.samples_in_split == sum(s.n_train for s in ds.seq_shards)


@pytest.mark.parametrize("mode", ["sliding", "prefixes"])
@pytest.mark.parametrize("m", [1, 3])
def test_one_pass_gives_every_window_of_every_user(world, mode, m):
    ds, content, parts = world
    want = Counter((u, w) for u, p in parts.items() for w in expected(p, m, mode))
    # one slot: the first samples_in_split rows of an epoch are exactly one pass over the shards
    ld = SequenceLoader(ds, content, batch_size=8, max_len=m, windows=mode, seed=4)
    assert ld.samples_in_split == sum(want.values())
    assert len(ld) == -(-ld.samples_in_split // 8)
    got = rows(ld)[:ld.samples_in_split]
    assert Counter(got) == want
    per_user = Counter(u for u, _ in got)
    for u, p in parts.items():
        if len(p) < 2:
            continue
        if mode == "prefixes":
            assert per_user[u] == len(p) - 1
        else:  # the union of the targets is the part after its first item, each once
            targets = Counter(x for uu, w in got if uu == u for x in w[1:])
            assert targets == Counter(p[1:].tolist())


def test_a_users_windows_spread_over_batches(world):
    ds, content, parts = world
    ld = SequenceLoader(ds, content, batch_size=8, max_len=2, windows="prefixes", seed=0)
    where: dict[int, set] = {}
    for i, b in enumerate(ld):
        for u in b.users.tolist():
            where.setdefault(u, set()).add(i)
    many = [u for u, p in parts.items() if len(p) - 1 >= 4]
    assert many and all(len(where[u]) >= 2 for u in many)


@pytest.mark.parametrize("mode", ["sliding", "prefixes"])
@pytest.mark.parametrize("policy", ["repeat", "drop"])
def test_two_ranks_with_workers_yield_equal_exact_batch_counts(world, mode, policy):
    ds, content, parts = world
    want = Counter((u, w) for u, p in parts.items() for w in expected(p, 3, mode))
    loaders = [SequenceLoader(ds, content, batch_size=4, max_len=3, windows=mode, policy=policy, rank=r,
                              world_size=2, num_workers=2, seed=7) for r in range(2)]
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) == len(loaders[1]) > 0
    got = Counter(row for batches in per_rank for row in rows(batches))
    assert not {u for u, _ in rows(per_rank[0])} & {u for u, _ in rows(per_rank[1])}
    if policy == "repeat":
        assert all(got[k] >= v for k, v in want.items())  # every window at least once
    else:
        assert all(v <= want[k] for k, v in got.items())  # nothing twice, nothing made up


@pytest.mark.parametrize("mode", ["sliding", "prefixes"])
def test_order_is_a_function_of_seed_and_epoch(world, mode):
    ds, content, _ = world
    kw = dict(batch_size=8, max_len=3, windows=mode, num_workers=2)
    a = SequenceLoader(ds, content, seed=5, **kw)
    e0 = digest(a)
    assert e0 == digest(SequenceLoader(ds, content, seed=5, **kw))
    a.set_epoch(1)
    assert digest(a) != e0
    assert digest(SequenceLoader(ds, content, seed=6, **kw)) != e0


@pytest.mark.parametrize("mode", ["sliding", "prefixes"])
@pytest.mark.parametrize("num_workers,world_size", [(2, 1), (0, 2)])
def test_resume_from_cursor(world, mode, num_workers, world_size):
    ds, content, _ = world
    kw = dict(batch_size=4, max_len=3, seed=1, windows=mode, num_workers=num_workers, world_size=world_size)
    full = SequenceLoader(ds, content, **kw)
    full.set_epoch(2)
    ref = list(full)
    key = [(b.seq.numpy().tobytes(), b.users.numpy().tobytes(), b.cursor) for b in ref]
    for k in (1, 5, len(ref) - 1):
        resumed = SequenceLoader(ds, content, start_cursor=ref[k - 1].cursor, **kw)
        resumed.set_epoch(2)
        got = [(b.seq.numpy().tobytes(), b.users.numpy().tobytes(), b.cursor) for b in resumed]
        assert got == key[k:]


def test_old_dataset_is_scanned_once_and_cached(world, tmp_path, monkeypatch):
    ds, content, _ = world
    old = tmp_path / "old"
    shutil.copytree(ds.path, old, ignore=shutil.ignore_patterns(".cache"))
    m = json.loads((old / "manifest.json").read_text())
    for e in m["seq_shards"]:
        del e["lengths"]  # a manifest without the shards' sequence lengths
    (old / "manifest.json").write_text(json.dumps(m))
    ods = Dataset.open(old)
    assert all(s.lengths is None for s in ods.seq_shards)
    assert ods.verify() == []
    cache = tmp_path / "cache"
    for mode in ("sliding", "prefixes"):
        new = SequenceLoader(ds, content, batch_size=8, max_len=3, windows=mode)
        scanned = SequenceLoader(ods, content, batch_size=8, max_len=3, windows=mode, cache_dir=cache)
        assert scanned.shard_samples == new.shard_samples and len(scanned) == len(new)
    assert [p.name[:12] for p in cache.iterdir()] == ["seq-lengths-"]  # one file, no temporaries

    def no_scan(path):
        raise AssertionError("scanned again")

    monkeypatch.setattr(W, "scan_lengths", no_scan)
    again = SequenceLoader(ods, content, batch_size=8, max_len=5, windows="sliding", cache_dir=cache)
    assert again.shard_samples == W.samples_per_shard(ds, 5, "sliding")
    # "last" reads nothing new
    SequenceLoader(ods, content, batch_size=8, max_len=5, windows="last", cache_dir=tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_manifest_lengths_are_checked(world, tmp_path):
    ds, _, _ = world
    assert ds.verify() == []
    bad = tmp_path / "bad"
    shutil.copytree(ds.path, bad, ignore=shutil.ignore_patterns(".cache"))
    m = json.loads((bad / "manifest.json").read_text())
    h = m["seq_shards"][0]["lengths"]
    k = sorted(h)[0]
    h[k] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="malformed file entry"):
        Dataset.open(bad)  # no longer adds up to the shard's samples
    h[k] -= 1
    h[sorted(h)[1]] += h.pop(k)  # adds up, but not what the shard holds
    (bad / "manifest.json").write_text(json.dumps(m))
    assert any("lengths" in p for p in Dataset.open(bad).verify())


def test_epoch_facts_and_config(world):
    ds, content, _ = world
    ld = SequenceLoader(ds, content, batch_size=8, max_len=3, windows="sliding", world_size=2, rank=0)
    facts = epoch_facts(ld)
    assert facts["samples"] == ld.samples_in_split and facts["batches_per_epoch"] == len(ld)
    assert facts["rows_per_epoch"] == len(ld) * 8 * 2
    assert epoch_line(facts).startswith("data: windows=sliding (max_len 3): ")
    cfg = build_config("tiny")
    assert cfg.data.windows == "last"
    set_key(cfg, "data.windows", "prefixes")
    validate(cfg)
    cfg.data.windows = "all"  # set in Python
    with pytest.raises(ConfigError, match=r"data.windows must be one of 'last', 'sliding', 'prefixes'") as e:
        validate(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.windows"):
        set_key(build_config("tiny"), "data.windows", "every")
    with pytest.raises(ValueError, match="windows must be one of"):
        SequenceLoader(ds, content, batch_size=8, max_len=3, windows="all")
