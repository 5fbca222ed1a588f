"""Bad input: skipped, counted and reported, never a crash mid-epoch; structural problems: one line."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from transrec.cli import main
from transrec.errors import DataError
from transrec.shards import stats as stats_mod
from transrec.shards.cache import build_or_load_item_cache
from transrec.shards.dataset import Dataset
from transrec.shards.format import DatasetWriter, sha256_file
from transrec.shards.loader import SequenceLoader
from transrec.shards.stats import SkipStats


def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def make(path, n_items=12, n_users=16, shard_size=4):
    w = DatasetWriter(path, shard_size=shard_size, seq_shard_size=4)
    for i in range(n_items):
        if i % 2:
            w.add_item(f"i{i}", image=png((20 * i, 100, 50)), image_ext="png")
        else:
            w.add_item(f"i{i}", title=f"item number {i}")
    for u in range(n_users):
        w.add_sequence(f"u{u}", [f"i{(u + k) % n_items}" for k in range(5)])
    return w.close()


def members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_members(path, items):
    with tarfile.open(path, "w") as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def refresh_manifest(ds_path):
    """Make the manifest agree with the (edited) shards, as a tool that wrote them would."""
    m = json.loads((ds_path / "manifest.json").read_text())
    for e in m["item_shards"] + m["seq_shards"]:
        p = ds_path / e["name"]
        e["bytes"], e["sha256"] = p.stat().st_size, sha256_file(p)
    (ds_path / "manifest.json").write_text(json.dumps(m))


def edit(path, fn):
    write_members(path, fn(members(path)))


@pytest.fixture
def bad(tmp_path):
    """A dataset with every kind of bad input inside its shards."""
    p = make(tmp_path / "bad")
    # items-000000: i0 txt, i1 png, i2 txt, i3 png -> empty title for i0, corrupt image for i1,
    # the image of i3 missing, and a duplicate of i2
    def items0(ms):
        out = []
        for name, data in ms:
            if name == "i0.txt":
                data = b"   "
            elif name == "i1.png":
                data = data[:30]
            elif name == "i3.png":
                continue
            out.append((name, data))
        return out + [("i2.txt", b"a second i2"), ("i2.json", b"{}")]
    edit(p / "items-000000.tar", items0)
    # seqs-000000: an unknown item id, a duplicate user, malformed JSON
    def seqs0(ms):
        out = []
        for name, data in ms:
            if name == "u0.json":
                obj = json.loads(data)
                obj["items"].insert(1, "no-such-item")
                data = json.dumps(obj).encode()
            elif name == "u2.json":
                data = b"{not json"
            out.append((name, data))
        return out + [("u1.json", ms[1][1])]
    edit(p / "seqs-000000.tar", seqs0)
    # seqs-000001: truncated inside the data of its second member
    raw = (p / "seqs-000001.tar").read_bytes()
    with tarfile.open(p / "seqs-000001.tar") as tf:
        cut = tf.getmembers()[1].offset_data + 5
    (p / "seqs-000001.tar").write_bytes(raw[:cut])
    refresh_manifest(p)
    return p


def test_bad_items_are_skipped_counted_and_reported(bad, tmp_path, caplog):
    before = dict(stats_mod.GLOBAL.counts)
    with caplog.at_level(logging.WARNING, logger="transrec.shards"):
        c = build_or_load_item_cache(bad, cache_dir=tmp_path / "cache", progress=False)
    ds = Dataset.open(bad)
    assert c.skipped == {"empty_title": 1, "corrupt_image": 1, "missing_image": 1, "duplicate_item": 1}
    assert sorted(np.array(ds.item_ids)[~c.valid]) == ["i0", "i1", "i3"]
    assert stats_mod.GLOBAL.counts.get("corrupt_image", 0) == before.get("corrupt_image", 0) + 1
    text = caplog.text
    assert "[empty_title]" in text and "[corrupt_image]" in text and "[missing_image]" in text


def test_bad_sequences_never_stop_an_epoch(bad, tmp_path, caplog):
    c = build_or_load_item_cache(bad, cache_dir=tmp_path / "cache", progress=False)
    ds = Dataset.open(bad)
    for split in ("train", "test"):
        ld = SequenceLoader(ds, c, split=split, batch_size=2, max_len=4)
        with caplog.at_level(logging.WARNING, logger="transrec.shards"):
            batches = list(ld)
        assert len(batches) == len(ld) > 0
        for b in batches:  # items without content never reach a batch
            assert c.valid[b.unique_items.numpy()].all()
        s = ld.stats.counts
        # training may take a second pass over a slot's shards to fill its batches (policy repeat)
        once = 1 if split == "test" else s["corrupt_sequence"]
        assert s["unknown_item"] >= 1 and s["duplicate_user"] == once and s["corrupt_sequence"] >= 1
        assert s["unreadable_shard"] >= 1 and s["item_without_content"] >= 1
    assert "[unreadable_shard]" in caplog.text and "[unknown_item]" in caplog.text
    assert "'no-such-item'" in caplog.text  # the warning names the offending id
    # with two workers the counts travel back from the worker processes
    ld = SequenceLoader(ds, c, split="test", batch_size=2, max_len=4, num_workers=2)
    assert len(list(ld)) == len(ld)
    assert ld.stats.counts["duplicate_user"] == 1 and ld.stats.counts["unreadable_shard"] >= 1


def test_warning_is_rate_limited(caplog):
    s = SkipStats(interval=60.0)
    with caplog.at_level(logging.WARNING, logger="transrec.shards"):
        for _ in range(50):
            s.skip("corrupt_image", "x")
        s.skip("empty_title", "y")
    assert s.counts == {"corrupt_image": 50, "empty_title": 1}
    assert caplog.text.count("[corrupt_image]") == 1 and caplog.text.count("[empty_title]") == 1


def _one_line_error(path, capsys):
    rc = main(["shards", "info", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    return err


def test_structural_problems_name_the_file(tmp_path, capsys):
    p = make(tmp_path / "d")
    err = _one_line_error(p / "missing-folder", capsys)
    assert "missing-folder" in err
    # truncated shard whose manifest was not updated
    raw = (p / "seqs-000001.tar").read_bytes()
    (p / "seqs-000001.tar").write_bytes(raw[:100])
    assert "seqs-000001.tar" in _one_line_error(p, capsys)
    (p / "seqs-000001.tar").write_bytes(raw)
    # a listed shard missing
    (p / "items-000002.tar").rename(p / "moved.tar")
    assert "items-000002.tar: listed in the manifest but missing" in _one_line_error(p, capsys)
    (p / "moved.tar").rename(p / "items-000002.tar")
    Dataset.open(p)  # whole again
    m = json.loads((p / "manifest.json").read_text())
    (p / "manifest.json").write_text(json.dumps({**m, "schema_version": 99}))
    assert "manifest.json: schema version 99" in _one_line_error(p, capsys)
    (p / "manifest.json").write_text(json.dumps({**m, "n_users": 0}))
    assert "manifest.json: empty dataset" in _one_line_error(p, capsys)
    (p / "manifest.json").write_text("{oops")
    assert "manifest.json: unreadable manifest" in _one_line_error(p, capsys)
    (p / "manifest.json").write_text(json.dumps(m))
    (p / "items.tsv").write_text("item_id\tmodality\ttrain_count\n")
    assert "items.tsv: 29 bytes, the manifest says" in _one_line_error(p, capsys)
    with pytest.raises(DataError, match="no usable items"):
        DatasetWriter(tmp_path / "empty").close()


def test_checksum_verification_names_the_shard(tmp_path, capsys):
    p = make(tmp_path / "d")
    raw = bytearray((p / "items-000001.tar").read_bytes())
    raw[600] ^= 0xFF  # same size, different bytes
    (p / "items-000001.tar").write_bytes(bytes(raw))
    rc = main(["shards", "info", str(p), "--verify"])
    err = capsys.readouterr().err
    assert rc == 2 and "items-000001.tar: checksum differs" in err


def test_skip_rate_names_the_rate_the_kind_and_the_setting():
    ok = stats_mod.skip_summary(n_items=100, items_invalid=5, item_skips={"corrupt_image": 5},
                                sequences_read=90, loader_skips={"item_without_content": 40})
    assert ok["items"]["rate"] == 0.05 and stats_mod.skip_violation(ok, 0.05) is None
    bad = stats_mod.skip_summary(n_items=100, items_invalid=0, item_skips={}, sequences_read=90,
                                 loader_skips={"corrupt_sequence": 8, "duplicate_user": 2,
                                               "unknown_item": 50})
    assert bad["sequences"]["skipped"] == 10 and bad["sequences"]["rate"] == 0.1
    line = stats_mod.skip_violation(bad, 0.05)
    assert line.startswith("10.0% of sequences skipped as bad input (10 of 100; mostly corrupt_sequence: 8)")
    assert line.endswith("above data.max_skip_rate=0.05; repair the data, or accept it with "
                         "data.max_skip_rate=0.11")
    assert stats_mod.skip_violation(bad, 0.11) is None
