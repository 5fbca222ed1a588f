"""``transrec shards info`` statistics on a dataset whose figures are known by hand; ``shards build``'s
help and its missing-items error."""

import json

import pytest

from transrec.cli import main
from transrec.shards.cache import build_or_load_item_cache
from transrec.shards.format import DatasetWriter
from transrec.shards.info import gini


@pytest.fixture()
def small(tmp_path):
    w = DatasetWriter(tmp_path / "d", shard_size=2)
    for i in range(4):
        w.add_item(f"t{i}", title=f"title {i}")
    w.add_item("p0", image=b"\x89PNG fake", image_ext="png")  # bytes are not decoded when writing
    w.add_sequence("u0", ["t0", "t1", "t0", "t2"])  # 4 interactions: train t0 t1, valid t0, test t2
    w.add_sequence("u1", ["t0", "p0"])  # train only
    w.add_sequence("u2", ["t0", "t1", "p0"])
    return w.close()


def test_info_statistics(small, capsys):
    assert main(["shards", "info", str(small), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["users"], st["items"], st["interactions"]) == (3, 5, 9)
    assert st["density"] == pytest.approx(9 / 15)
    assert st["sequence_length"]["p0"] == 2 and st["sequence_length"]["p50"] == 3
    assert st["sequence_length"]["p100"] == 4 and st["sequence_length"]["mean"] == pytest.approx(3)
    # counts t0 4, t1 2, t2 1, t3 0, p0 2: the top 1% is one item, t0, with 4 of 9
    assert st["popularity"]["top1pct_share"] == pytest.approx(4 / 9)
    assert st["popularity"]["items_never_seen"] == 1
    assert st["popularity"]["gini"] == pytest.approx(gini([4, 2, 1, 0, 2]))
    assert st["modality"] == {"text_items": 4, "image_items": 1, "text_interactions": 7,
                              "image_interactions": 2}
    assert st["splits"] == {"train_interactions": 2 + 2 + 1, "valid": 2, "test": 2, "train_only_users": 1}
    assert main(["shards", "info", str(small)]) == 0
    text = capsys.readouterr().out
    assert "3 users, 5 items, 9 interactions" in text and "Gini" in text and "median 3" in text


def test_gini_bounds():
    assert gini([3, 3, 3]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 10]) == pytest.approx(0.75)  # (n - 1) / n for one item holding everything
    assert gini([]) == 0.0


def test_build_help_lists_columns_and_missing_items_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["shards", "build", "--help"])
    out = capsys.readouterr().out
    assert "reviewerid" in out and "product_title" in out and "image_path" in out
    (tmp_path / "inter.csv").write_text("user,item\nu,i\n")
    assert main(["shards", "build", "--interactions", str(tmp_path / "inter.csv"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--items FILE is missing" in err[0]


def test_info_shows_skips_recorded_when_writing_and_in_the_item_cache(tmp_path, capsys):
    w = DatasetWriter(tmp_path / "d", shard_size=2)
    for i in range(4):
        w.add_item(f"t{i}", title=f"title {i}")
    w.add_item("t0", title="again")  # duplicate: skipped while writing
    w.add_item("p0", image=b"\x89PNG fake", image_ext="png")  # written; the cache cannot decode it
    w.add_sequence("u0", ["t0", "t1", "p0", "t2"])
    path = w.close()
    assert main(["shards", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped while writing: duplicate_item 1" in out and "item cache" not in out
    build_or_load_item_cache(path, progress=False)
    assert main(["shards", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped in item cache items-" in out and ": 1 of 5 items (20.0%; corrupt_image 1)" in out
    assert main(["shards", "info", str(path), "--json"]) == 0
    caches = json.loads(capsys.readouterr().out)["skipped"]["item_caches"]
    assert [c["skipped"] for c in caches.values()] == [{"corrupt_image": 1}]


def test_verify_reports_every_count_that_contradicts_the_shards(small, capsys):
    assert main(["shards", "info", str(small), "--verify"]) == 0
    assert "checksums and counts verified" in capsys.readouterr().out
    mpath = small / "manifest.json"
    m = json.loads(mpath.read_text())
    assert [e["samples"] for e in m["item_shards"]] == [2, 2, 1]
    m["item_shards"][0]["samples"], m["item_shards"][2]["samples"] = 1, 2  # the sum still agrees
    m["n_interactions"] += 3
    m["modality"] = {"text": 3, "image": 2}
    mpath.write_text(json.dumps(m))
    assert main(["shards", "info", str(small), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "transrec: error: items-000000.tar samples: the manifest says 1, the shards hold 2",
        "transrec: error: items-000002.tar samples: the manifest says 2, the shards hold 1",
        "transrec: error: manifest.json n_interactions: the manifest says 12, the shards hold 9",
        "transrec: error: manifest.json modality.text: the manifest says 3, the shards hold 4",
        "transrec: error: manifest.json modality.image: the manifest says 2, the shards hold 1",
        f"transrec: error: {small}: 5 mismatches between the manifest and the shards (rebuild the dataset)",
    ]
