"""``transrec shards info`` statistics on a dataset whose figures are known by hand; ``shards build``'s
help and its missing-items error."""

import json

import pytest
from transrec.shards.format import DatasetWriter
from transrec.shards.info import gini

from transrec.cli import main


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
