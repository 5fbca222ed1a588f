"""A full disk while writing an export, an item cache or a prefix cache: one line (exit 74 from the
command line, no traceback), the temporary folder removed, every complete export or cache as it was.

The function that writes the bytes (safetensors' ``save_file``, numpy's ``save``, the block
reservation of a memory-mapped file) is replaced by one that writes part of its file and then fails
as a full file system does (``OSError`` ENOSPC). A real full file system (a small tmpfs) is in
``tests/test_engine_faults_disk.py``."""

from __future__ import annotations

import errno
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_parts import train_steps

import transrec.models.export as mexport
from transrec.cli import main
from transrec.config import build_config
from transrec.engine.trainer import Trainer
from transrec.models import SequentialRecommender
from transrec.models.export import read_export
from transrec.models.prefix import build_or_load_prefix_store
from transrec.shards.batch import TEXT
from transrec.shards.cache import ItemCache, build_or_load_item_cache
from transrec.shards.prefix_cache import PrefixStore
from transrec.shards.synth import synthesize
from transrec.storage import EXIT_WRITE_FAILED, WriteFailed

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "data.batch_size=8", "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false",
          "eval.max_users=0", "optim.steps=1", "model.text.trainable=1"]  # a frozen text block: prefix cache
SIZE = r"[\d.]+ (?:[KMGT]iB|B)"  # transrec.storage.human
FAILED = re.compile(rf"^transrec: error: (building the [\w ]+|writing the export) in (\S+) failed: No space "
                    rf"left on device; (it needs about {SIZE} \([\w' ]+\)|{SIZE} were written "
                    rf"before it failed), {SIZE} free; nothing complete was changed$")

pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def no_room(fd, offset, length):
    """``os.posix_fallocate`` on a full disk."""
    raise enospc()


def failing(real, name: str, argpos: int = 1):
    """``real`` (a writer whose ``argpos``-th argument is the path, counting from 1) except for paths
    ending in ``name``: half of the bytes ``real`` would write are left in the file, then ENOSPC."""

    def write(*args, **kwargs):
        path = Path(str(args[argpos - 1]))
        if not path.name.endswith(name):
            return real(*args, **kwargs)
        real(*args, **kwargs)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        raise enospc()

    return write


def one_line(err: str) -> re.Match:
    """The one error line of a command's stderr (the only line for export and eval; train logs its
    set-up before it), matched against the write-failure form."""
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    m = FAILED.match(errors[0])
    assert m, err
    return m


def digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset, run folder, export folder): one trained step with a frozen text block (so the item
    cache and a text prefix cache are built beside the dataset), and an export of it."""
    root = tmp_path_factory.mktemp("writes")
    data = synthesize(root / "d", domain="source", n_users=60, n_items=30, seed=9, min_len=3, max_len=10)
    cfg = build_config("tiny", overrides=[f"data.path={data}", f"run.out={root / 'run'}", *COMMON])
    tr = Trainer(cfg, show=False)
    train_steps(tr, save=True)
    tr.close()
    assert main(["export", "--run", str(root / "run"), "--out", str(root / "export")]) == 0
    return data, root / "run", root / "export"


# ----------------------------------------------------------------------------- export

def test_a_failed_export_is_one_line_exit_74_and_keeps_the_previous_export(trained, tmp_path, monkeypatch,
                                                                            capsys):
    _, run, export = trained
    out = tmp_path / "export"
    shutil.copytree(export, out)
    before = digest(out)
    capsys.readouterr()

    monkeypatch.setattr(mexport, "save_file", failing(mexport.save_file, "model.safetensors", argpos=2))
    assert main(["export", "--run", str(run), "--out", str(out)]) == EXIT_WRITE_FAILED
    m = one_line(capsys.readouterr().err)
    assert m[1] == "writing the export" and Path(m[2]) == out and "its weights' size" in m[3]
    assert temporaries(tmp_path) == [] and digest(out) == before  # no temporary, the export as it was
    assert read_export(out)["step"] == 1
    SequentialRecommender.from_export(out)  # still loads
    monkeypatch.undo()
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0  # space back: it writes


def test_an_export_that_cannot_fit_stops_before_writing(trained, tmp_path, monkeypatch, capsys):
    _, run, export = trained
    out = tmp_path / "export"
    shutil.copytree(export, out)
    before = digest(out)
    need = (out / "model.safetensors").stat().st_size
    monkeypatch.setattr("transrec.storage.free_bytes", lambda path: need // 2)
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(out)]) == EXIT_WRITE_FAILED
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"transrec: error: writing the export in {out} stopped before writing: it needs "
                          "about ") and "(its weights' size)" in err and "free some space" in err
    assert temporaries(tmp_path) == [] and digest(out) == before


# ----------------------------------------------------------------------------- item cache

def test_a_failed_item_cache_build_is_one_line_and_keeps_the_other_caches(trained, tmp_path, monkeypatch):
    data, _, _ = trained
    cache = tmp_path / "cache"
    old = build_or_load_item_cache(data, max_text_len=12, cache_dir=cache, progress=False)
    before = digest(old.path)
    monkeypatch.setattr(np, "save", failing(np.save, "tokens.npy"))
    with pytest.raises(WriteFailed) as info:
        build_or_load_item_cache(data, max_text_len=16, cache_dir=cache, progress=False)  # another key
    m = one_line(f"transrec: error: {info.value}")
    assert m[1] == "building the item cache" and Path(m[2]).parent == cache and "its arrays' size" in m[3]
    assert info.value.exit_code == EXIT_WRITE_FAILED
    assert temporaries(cache) == []
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [old.path.name]
    assert digest(old.path) == before
    again = ItemCache(old.path)
    assert np.array_equal(again.tokens, old.tokens) and np.array_equal(again.images, old.images)
    monkeypatch.undo()
    assert build_or_load_item_cache(data, max_text_len=16, cache_dir=cache, progress=False).max_text_len == 16


def test_an_item_cache_whose_blocks_cannot_be_reserved_fails_before_filling(trained, tmp_path, monkeypatch):
    """The image array is a memory map: its blocks are reserved up front, so a full disk is an error
    there, not a SIGBUS while the map is filled."""
    data, _, _ = trained
    cache = tmp_path / "cache"
    monkeypatch.setattr("os.posix_fallocate", no_room)
    with pytest.raises(WriteFailed, match=r"building the item cache in .* failed: No space left on device"):
        build_or_load_item_cache(data, max_text_len=12, cache_dir=cache, progress=False)
    assert temporaries(cache) == [] and not [p for p in cache.iterdir() if p.is_dir()]


def test_an_item_cache_that_cannot_fit_stops_before_writing(trained, tmp_path, monkeypatch):
    data, _, _ = trained
    cache = tmp_path / "cache"
    monkeypatch.setattr("transrec.storage.free_bytes", lambda path: 100)
    with pytest.raises(WriteFailed, match=r"building the item cache in .* stopped before writing: it needs "
                                          r"about .* \(its arrays' size\) and 100 B are free"):
        build_or_load_item_cache(data, max_text_len=12, cache_dir=cache, progress=False)
    assert not [p for p in cache.iterdir() if p.is_dir()]


@pytest.mark.parametrize("command", ["eval", "train"])
def test_the_command_building_an_item_cache_exits_74_with_one_line(trained, tmp_path, monkeypatch, capsys,
                                                                    command):
    data, run, _ = trained
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".cache"))  # no cache yet: it is built
    monkeypatch.setattr(np, "save", failing(np.save, "valid.npy"))
    capsys.readouterr()
    if command == "eval":
        argv = ["eval", "--run", str(run), "--data", str(copy), "--progress", "off"]
    else:
        argv = ["train", "--data", str(copy), "--out", str(tmp_path / "run"), "--preset", "tiny", *COMMON]
    assert main(argv) == EXIT_WRITE_FAILED
    m = one_line(capsys.readouterr().err)
    assert m[1] == "building the item cache" and Path(m[2]).parent == copy / ".cache"
    assert temporaries(copy / ".cache") == [] and not [p for p in (copy / ".cache").iterdir() if p.is_dir()]


# ----------------------------------------------------------------------------- prefix cache

def _text_encoder(run: Path):
    model = SequentialRecommender.from_export(run.parent / "export")
    return model.text_encoder


def test_a_failed_prefix_cache_build_is_one_line_and_keeps_the_other_stores(trained, tmp_path, monkeypatch):
    data, run, _ = trained
    content = build_or_load_item_cache(data, max_text_len=12, progress=False)
    enc = _text_encoder(run)
    cache = tmp_path / "prefix"
    old = build_or_load_prefix_store(content, enc, TEXT, cache_dir=cache, dtype="bf16", progress=False)
    before = digest(old.path)
    monkeypatch.setattr(np, "save", failing(np.save, "item_row.npy"))  # the last array, after the values
    with pytest.raises(WriteFailed) as info:
        build_or_load_prefix_store(content, enc, TEXT, cache_dir=cache, dtype="fp16", progress=False)
    m = one_line(f"transrec: error: {info.value}")
    assert m[1] == "building the text prefix cache" and Path(m[2]).parent == cache
    assert "were written before it failed" in m[3]
    assert temporaries(cache) == []
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [old.path.name]
    assert digest(old.path) == before
    items = np.flatnonzero(np.asarray(content.modality) == TEXT)[:5]
    assert torch.equal(PrefixStore(old.path).gather(items, 12), old.gather(items, 12))
    monkeypatch.undo()
    assert build_or_load_prefix_store(content, enc, TEXT, cache_dir=cache, dtype="fp16",
                                      progress=False).dtype == "fp16"


def test_a_prefix_store_that_cannot_fit_stops_before_the_encoder_runs(trained, tmp_path, monkeypatch):
    data, run, _ = trained
    content = build_or_load_item_cache(data, max_text_len=12, progress=False)
    enc = _text_encoder(run)
    cache = tmp_path / "prefix"

    def never(*a, **k):
        raise AssertionError("the encoder ran although the store cannot be written")

    monkeypatch.setattr(enc, "forward_prefix", never)
    with monkeypatch.context() as m:
        m.setattr("transrec.storage.free_bytes", lambda path: 1000)
        with pytest.raises(WriteFailed, match=r"building the text prefix cache in .* stopped before "
                                              r"writing: it needs about .* \(its arrays' size\)"):
            build_or_load_prefix_store(content, enc, TEXT, cache_dir=cache, progress=False)
    assert temporaries(cache) == []

    monkeypatch.setattr("os.posix_fallocate", no_room)  # the values' blocks cannot be reserved
    with pytest.raises(WriteFailed, match=r"building the text prefix cache in .* failed: No space left"):
        build_or_load_prefix_store(content, enc, TEXT, cache_dir=cache, progress=False)
    assert temporaries(cache) == [] and not [p for p in cache.iterdir() if p.is_dir()]


def test_train_building_a_prefix_cache_exits_74_with_one_line(trained, tmp_path, monkeypatch, capsys):
    data, _, _ = trained
    cache = data / ".cache"
    stores = sorted(p.name for p in cache.iterdir() if p.name.startswith("prefix-") and p.is_dir())
    assert stores, "the trained run built a prefix cache"
    monkeypatch.setattr(np, "save", failing(np.save, "item_row.npy"))
    capsys.readouterr()
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny", *COMMON,
            "data.prefix_cache_dtype=fp16"]  # another key: a new store is built
    assert main(argv) == EXIT_WRITE_FAILED
    m = one_line(capsys.readouterr().err)
    assert m[1] == "building the text prefix cache" and Path(m[2]).parent == cache
    assert temporaries(cache) == []
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("prefix-") and p.is_dir()) == stores
