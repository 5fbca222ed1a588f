"""Checkpoints are never unpickled: a payload planted in any checkpoint file at any ZeRO stage is
refused by `train` (resume), `eval` and `export` with one line, and never runs. Every ZeRO stage
exports a model with frozen weights."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint
from train_parts import train_steps

from transrec.cli import main as cli_main
from transrec.config import build_config
from transrec.engine.checkpoint import CheckpointError, CheckpointManager, weights_only_loads
from transrec.engine.consolidate import export_run
from transrec.engine.trainer import Trainer
from transrec.errors import UserError
from transrec.models import SequentialRecommender
from transrec.shards.synth import synthesize

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "data.batch_size=8", "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false",
          "eval.max_users=0", "optim.steps=1", "model.text.trainable=1"]  # frozen text embeddings
STAGES = (0, 1, 2, 3)


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained step per ZeRO stage: {stage: (data, run folder)}."""
    root = tmp_path_factory.mktemp("safety")
    data = synthesize(root / "d", domain="source", n_users=60, n_items=30, seed=9, min_len=3, max_len=10)
    out = {}
    for stage in STAGES:
        cfg = build_config("tiny", overrides=[f"data.path={data}", f"run.out={root / f'r{stage}'}", *COMMON,
                                              f"deepspeed.zero_stage={stage}"])
        tr = Trainer(cfg, show=False)
        train_steps(tr, save=True)
        tr.close()
        out[stage] = (data, root / f"r{stage}")
    return out


def plant(run: Path, name: str, marker: Path) -> Path:
    """Add a Payload to checkpoint file ``name`` and update the manifest's sizes, as a crafted
    checkpoint would; returns the file."""
    ck = CheckpointManager(run)
    folder = ck.dir / ck.latest()
    f = folder / name
    with weights_only_loads(f):
        obj = torch.load(f, map_location="cpu", weights_only=True)
    obj["extra"] = Payload(marker)
    torch.save(obj, f)
    man = json.loads((folder / "manifest.json").read_text())
    man["files"][name] = f.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(man))
    assert any("open" in g for g in get_unsafe_globals_in_checkpoint(f))  # the payload is in the file
    return f


def _files(run: Path) -> list[str]:
    ck = CheckpointManager(run)
    return sorted(p.name for p in (ck.dir / ck.latest()).glob("*.pt"))


@pytest.mark.parametrize("stage", STAGES)
def test_a_planted_payload_is_refused_by_train_eval_export_and_never_runs(runs, stage, tmp_path, capsys):
    data, run = runs[stage]
    kinds = _files(run)
    assert "rng-rank00000.pt" in kinds and any("model_states" in k for k in kinds)
    assert stage == 0 or any("optim_states" in k for k in kinds)
    for name in kinds:
        copy = tmp_path / f"run-{name}"
        shutil.copytree(run, copy)
        marker = tmp_path / f"ran-{name}"
        plant(copy, name, marker)
        argvs = {
            "train": ["train", "--data", str(data), "--out", str(copy), *COMMON, "optim.steps=2",
                      f"deepspeed.zero_stage={stage}"],
            "eval": ["eval", "--run", str(copy)],
            "export": ["export", "--run", str(copy), "--out", str(tmp_path / f"e-{name}")],
        }
        for cmd, argv in argvs.items():
            if cmd != "train" and name.startswith("rng-"):
                continue  # eval and export read no RNG state
            code = cli_main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2, (cmd, name, err)
            assert "refused to load" in err[-1] and name in err[-1], (cmd, name, err[-1])
            assert not marker.exists(), f"{cmd} ran the payload in {name}"


def test_forced_weights_only_overrides_an_explicit_weights_only_false(tmp_path):
    """DeepSpeed calls torch.load(..., weights_only=False); inside weights_only_loads it is refused."""
    marker = tmp_path / "ran"
    f = tmp_path / "x.pt"
    torch.save({"a": torch.ones(1), "b": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        with weights_only_loads(f):
            torch.load(f, weights_only=False)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_exports_a_model_with_frozen_weights(runs, stage, tmp_path):
    _, run = runs[stage]
    out = export_run(run, tmp_path / "e")
    model = SequentialRecommender.from_export(out)
    frozen = [n for n, p in model.named_parameters() if "word_embeddings" in n]
    assert frozen, "the text encoder should have frozen embeddings in this config"
    ref = SequentialRecommender.from_export(export_run(runs[0][1], tmp_path / "e0"))
    # frozen weights never train: every stage exports the same ones (same seed, same init)
    for n in frozen:
        assert torch.equal(model.state_dict()[n], ref.state_dict()[n])


def _tree(p: Path) -> dict:
    return {str(f.relative_to(p)): f.stat().st_size for f in sorted(p.rglob("*"))}


def test_export_never_destroys_what_is_at_out(runs, tmp_path):
    data, run = runs[0]
    before = {p: _tree(p) for p in (run, data)}
    refused = {
        run: "is, holds or lies in the run folder",
        data: "is, holds or lies in the dataset folder",
        run.parent: "is, holds or lies in the run folder",
        run / "checkpoints": "is, holds or lies in the run folder",
        run / "config.yaml": "exists and is not a folder",
    }
    for out, msg in refused.items():
        for overwrite in (False, True):
            with pytest.raises(UserError, match=msg):
                export_run(run, out, overwrite=overwrite)
    assert {p: _tree(p) for p in (run, data)} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an export; .*--overwrite"):
        export_run(run, other)
    assert (other / "notes.txt").read_text() == "keep"
    export_run(run, other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "export.json", "model.safetensors"]
    export_run(run, other)  # an earlier export is replaced without --overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no temporary left beside it


def test_train_refusals_are_one_line(runs, tmp_path, capsys, monkeypatch):
    data, run = runs[0]
    afile = tmp_path / "afile"
    afile.write_text("x")
    changed = ["train", "--data", str(data), "--out", str(run), *COMMON, "optim.steps=2", "model.dim=32"]
    cases = {
        "exists and is not a folder": ["train", "--data", str(data), "--out", str(afile), *COMMON],
        "must be a finite number, got nan": ["train", "--data", str(data), "--out", str(tmp_path / "n"),
                                             *COMMON, "optim.lr=nan"],
        "holds a checkpoint of another model .model.dim: 64 -> 32.": changed,
    }
    for msg, argv in cases.items():
        code = cli_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and re.search(msg, err[-1]) and not any("Traceback" in e for e in err), (msg, err)
    # a folder the process may not write (simulated: the tests may run as root, which writes anywhere)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if "ro" in str(p) else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    assert cli_main(["train", "--data", str(data), "--out", str(tmp_path / "ro" / "r"), *COMMON]) == 2
    assert "cannot write there" in capsys.readouterr().err
