"""Dataset format: write -> open round trip, keys, counts, item index, log q."""

import io
import json

import numpy as np
import torch
import webdataset as wds
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from transrec.shards.batch import IMAGE, TEXT, ArrayContent
from transrec.shards.dataset import Dataset
from transrec.shards.format import SCHEMA_VERSION, DatasetWriter, sanitize_key, unsanitize_key
from transrec.shards.loader import SequenceLoader


@given(st.text(min_size=1, max_size=30))
def test_keys_are_tar_safe_and_reversible(raw):
    key = sanitize_key(raw)
    assert "." not in key and "/" not in key and "\\" not in key and "\0" not in key
    assert unsanitize_key(key) == raw


def test_round_trip(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (33, 35), (1, 2, 3)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    titles = {"a.1": "red shoe", "b/2": "blue hat", "c": None, "d": "green lamp"}
    w = DatasetWriter(tmp_path / "d", shard_size=3, seq_shard_size=2, name="rt")
    for k, t in titles.items():
        assert w.add_item(k, title=t) if t else w.add_item(k, image=jpeg, image_ext="jpeg",
                                                           meta={"colour": "x"})
    seqs = {"u1": ["a.1", "b/2", "c", "d"], "u2": ["c", "d"], "u 3": ["d", "a.1", "c", "d"]}
    for u, s in seqs.items():
        w.add_sequence(u, s)
    w.close()
    ds = Dataset.open(tmp_path / "d")
    m = ds.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["n_interactions"] == 10
    assert (ds.n_items, ds.n_users) == (4, 3) and m["modality"] == {"text": 3, "image": 1}
    assert [s.samples for s in ds.item_shards] == [3, 1] and [s.samples for s in ds.seq_shards] == [2, 1]
    assert [s.n_eval for s in ds.seq_shards] == [1, 1] and [s.n_train for s in ds.seq_shards] == [2, 1]
    assert [unsanitize_key(k) for k in ds.item_ids] == list(titles)
    assert ds.modality.tolist() == [TEXT, TEXT, IMAGE, TEXT]
    # training-split counts: u1 -> a.1 b/2 ; u2 (2 interactions, train only) -> c d ; u 3 -> d a.1
    assert ds.train_count.tolist() == [2, 1, 1, 2]
    q = np.exp(ds.log_q.astype(np.float64))
    assert np.isclose(q.sum(), 1.0) and np.allclose(q, (ds.train_count + 1) / (6 + 4))
    got = {}
    for s in wds.WebDataset([str(p.path) for p in ds.item_shards], shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        got[meta["id"]] = s.get("txt", b"").decode() or s["jpg"]
    assert got == {k: (t or jpeg) for k, t in titles.items()}
    users = {}
    for s in wds.WebDataset([str(p.path) for p in ds.seq_shards], shardshuffle=False, empty_check=False):
        obj = json.loads(s["json"])
        users[obj["user"]] = (obj["index"], [unsanitize_key(k) for k in obj["items"]])
    assert users == {u: (i, s) for i, (u, s) in enumerate(seqs.items())}

    # an evaluation row never lists its own target among the items to mask, even when repeated
    content = ArrayContent(ds.modality, np.array([0, 1, 0, 2]), np.ones((3, 4), np.int32),
                           np.ones(3, np.int32), np.zeros((1, 3, 32, 32), np.uint8))
    test = list(SequenceLoader(ds, content, split="test", batch_size=3, max_len=3))
    rows = {int(b.users[r]): (b.seq[r].tolist(), sorted(b.hist_items[b.hist_rows == r].tolist()))
            for b in test for r in range(3) if b.row_valid[r]}
    assert rows == {0: ([0, 1, 2, 3], [0, 1, 2]), 2: ([3, 0, 2, 3], [0, 2])}
    assert len(test) == 1 and torch.equal(test[0].row_valid, torch.tensor([True, True, False]))
