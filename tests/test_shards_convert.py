"""`transrec shards build` and each converter, on fixture files written in exactly their layout."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from transrec.cli import main
from transrec.errors import UserError
from transrec.shards.convert import convert
from transrec.shards.dataset import Dataset
from transrec.shards.format import sanitize_key


def jpg(colour, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def sequences(ds):
    out = {}
    for s in wds.WebDataset([str(p.path) for p in ds.seq_shards], shardshuffle=False, empty_check=False):
        obj = json.loads(s["json"])
        out[obj["user"]] = obj["items"]
    return out


def items(ds):
    return {s["__key__"]: s for s in wds.WebDataset([str(p.path) for p in ds.item_shards],
                                                     shardshuffle=False, empty_check=False)}


def test_build_from_tables_cli(tmp_path, capsys):
    (tmp_path / "covers").mkdir()
    (tmp_path / "covers" / "i2.jpg").write_bytes(jpg("red"))
    (tmp_path / "covers" / "i3.png").write_bytes(b"")  # unreadable
    (tmp_path / "inter.csv").write_text(
        "user_id,item_id,timestamp\n"
        "u1,i2,30\nu1,i1,10\nu1,i.4/x,20\n"   # file order differs from time order
        "u2,i1,5\nu2,i9,6\nu2,i2,7\n")        # i9 is not an item
    (tmp_path / "items.tsv").write_text("item_id\ttitle\timage\n"
                                        "i1\tred striped shirt\t\n"
                                        "i2\t\ti2.jpg\n"
                                        "i3\t\ti3.png\n"
                                        "i.4/x\tblue mug\t\n")
    rc = main(["shards", "build", "--interactions", str(tmp_path / "inter.csv"), "--items",
               str(tmp_path / "items.tsv"), "--images", str(tmp_path / "covers"), "--out",
               str(tmp_path / "ds"), "--shard-size", "2", "--quiet"])
    assert rc == 0
    line = capsys.readouterr().out
    assert "2 users, 3 items" in line and "unknown_item 1" in line and "corrupt_image 1" in line
    ds = Dataset.open(tmp_path / "ds")
    assert len(ds.item_shards) == 2
    k4 = sanitize_key("i.4/x")
    assert "." not in k4 and "/" not in k4
    assert sequences(ds) == {"u1": ["i1", k4, "i2"], "u2": ["i1", "i2"]}
    it = items(ds)
    assert it["i1"]["txt"] == b"red striped shirt" and "jpg" in it["i2"]
    assert ds.modality[ds.item_index["i2"]] == 1 and ds.modality[ds.item_index["i1"]] == 0
    assert ds.manifest["skipped_while_building"]["unknown_item"] == 1


def test_build_jsonl_with_iso_dates(tmp_path):
    (tmp_path / "inter.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"user": "a", "item": "x", "time": "2024-01-02T00:00:00"},
        {"user": "a", "item": "y", "time": "2024-01-01T00:00:00"},
    ]) + "\n")
    (tmp_path / "items.jsonl").write_text('{"item": "x", "title": "lamp"}\n{"item": "y", "title": "hat"}\n')
    main(["shards", "build", "--interactions", str(tmp_path / "inter.jsonl"), "--items",
          str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "ds"), "--quiet"])
    assert sequences(Dataset.open(tmp_path / "ds")) == {"a": ["y", "x"]}


def test_build_missing_column_is_one_line_error(tmp_path, capsys):
    (tmp_path / "inter.csv").write_text("who,what\n1,2\n")
    (tmp_path / "items.csv").write_text("item,title\n2,x\n")
    rc = main(["shards", "build", "--interactions", str(tmp_path / "inter.csv"), "--items",
               str(tmp_path / "items.csv"), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "inter.csv: no user column" in err


def test_recbole(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                "1\t10\t4\t300\n1\t20\t5\t100\n1\t30\t3\t200\n2\t20\t1\t50\n")
    (d / "ml.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
                               "10\tToy Story\t1995\tAnimation\n20\tHeat\t1995\tAction\n"
                               "30\tCasino\t1995\tDrama\n")
    main(["shards", "convert", "--format", "recbole", "--input", str(d), "--out", str(tmp_path / "o"),
          "--quiet"])
    ds = Dataset.open(tmp_path / "o")
    assert sequences(ds) == {"1": ["20", "30", "10"], "2": ["20"]}
    assert items(ds)["10"]["txt"] == b"Toy Story"
    assert ds.manifest["modality"] == {"text": 3, "image": 0}


def test_mind(tmp_path):
    d = tmp_path / "MINDsmall"
    d.mkdir()
    (d / "news.tsv").write_text(
        "N1\tsports\tfootball\tTeam wins the cup\tabstract\thttp://x\t[]\t[]\n"
        "N2\tnews\tworld\tStorm hits coast\tabs\thttp://y\t[]\t[]\n"
        "N3\tfood\trecipes\tBest soup ever\tabs\thttp://z\t[]\t[]\n"
        "N4\tfood\trecipes\t\tabs\thttp://z\t[]\t[]\n")
    (d / "behaviors.tsv").write_text(
        "2\tU1\t11/15/2019 10:22:32 AM\tN1 N2\tN3-1 N4-0\n"
        "1\tU1\t11/14/2019 9:00:00 AM\tN1 N2\tN2-0 N4-1\n"
        "3\tU2\t11/15/2019 8:00:00 AM\tN3\tN1-1\n")
    main(["shards", "convert", "--format", "mind", "--input", str(d), "--out", str(tmp_path / "o"),
          "--quiet"])
    ds = Dataset.open(tmp_path / "o")
    # U1: history, then clicks in time order (N4 has an empty title: skipped and counted)
    assert sequences(ds) == {"U1": ["N1", "N2", "N3"], "U2": ["N3", "N1"]}
    assert ds.manifest["skipped_while_building"]["empty_title"] == 1
    assert items(ds)["N2"]["txt"] == b"Storm hits coast"


def test_amazon(tmp_path):
    d = tmp_path / "beauty"
    (d / "images").mkdir(parents=True)
    (d / "images" / "B01.jpg").write_bytes(jpg("blue"))
    (d / "images" / "B02.jpg").write_bytes(jpg("green"))
    (d / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"reviewerID": "A1", "asin": "B02", "unixReviewTime": 20, "overall": 5.0},
        {"reviewerID": "A1", "asin": "B01", "unixReviewTime": 10, "overall": 4.0},
        {"reviewerID": "A1", "asin": "B03", "unixReviewTime": 30, "overall": 4.0},
    ]) + "\n")
    (d / "meta_beauty.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"asin": "B01", "title": "Rose lipstick", "image": "B01.jpg"},
        {"asin": "B02", "title": "Mint shampoo", "image": ["B02.jpg"]},
        {"asin": "B03", "title": "Night cream"},
    ]) + "\n")
    main(["shards", "convert", "--format", "amazon", "--input", str(d), "--out", str(tmp_path / "o"),
          "--image-frac", "1.0", "--quiet"])
    ds = Dataset.open(tmp_path / "o")
    assert sequences(ds) == {"A1": ["B01", "B02", "B03"]}
    it = items(ds)
    assert "jpg" in it["B01"] and "jpg" in it["B02"] and it["B03"]["txt"] == b"Night cream"
    main(["shards", "convert", "--format", "amazon", "--input", str(d), "--out", str(tmp_path / "o2"),
          "--image-frac", "0.0", "--quiet"])
    assert Dataset.open(tmp_path / "o2").manifest["modality"] == {"text": 3, "image": 0}


def test_csv_images(tmp_path):
    d = tmp_path / "pixelrec"
    (d / "covers").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        (d / "covers" / f"{i}.jpg").write_bytes(jpg(tuple(int(x) for x in rng.integers(0, 255, 3))))
    (d / "covers" / "9.jpg").write_bytes(jpg("red")[:40])  # truncated JPEG
    (d / "interactions.csv").write_text("item_id,user_id,timestamp\n0,u1,1\n1,u1,2\n2,u2,1\n3,u2,2\n"
                                        "9,u2,3\n7,u1,3\n")
    main(["shards", "convert", "--format", "csv-images", "--input", str(d), "--out", str(tmp_path / "o"),
          "--quiet"])
    ds = Dataset.open(tmp_path / "o")
    assert ds.manifest["modality"] == {"text": 0, "image": 4}
    assert sequences(ds) == {"u1": ["0", "1"], "u2": ["2", "3"]}
    skipped = ds.manifest["skipped_while_building"]
    assert skipped["corrupt_image"] == 1 and skipped["missing_image"] == 1 and skipped["unknown_item"] == 2


def test_unknown_format_and_missing_input(tmp_path):
    with pytest.raises(UserError, match="unknown format"):
        convert("movielens", tmp_path, tmp_path / "o")
    with pytest.raises(UserError, match="behaviors.tsv"):
        convert("mind", tmp_path, tmp_path / "o")
