"""The frozen-prefix cache inside the engine: ``transrec train`` wraps the item content when the
text encoder's bottom block is frozen, says so in one line, and trains and evaluates to the same
losses and metrics as the run with the cache switched off (fp32 storage)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.shards.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, data: Path, name: str, *extra: str) -> tuple[str, list[dict]]:
    cmd = [sys.executable, "-m", "transrec.cli", "train", "--data", str(data), "--out", str(tmp_path / name),
           "--preset", "tiny", "optim.steps=4", "run.log_every=1", "run.progress=false",
           "model.text.trainable=1", "data.prefix_cache_dtype=fp32", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return proc.stderr, rows  # the cache line is console output: stderr


@pytest.mark.slow
def test_engine_trains_and_evaluates_the_same_with_and_without_the_cache(tmp_path):
    data = synthesize(tmp_path / "data", domain="target", n_users=120, n_items=80, seed=3)
    out_on, rows_on = _train(tmp_path, data, "on")
    out_off, rows_off = _train(tmp_path, data, "off", "data.prefix_cache=false")

    on_lines = [ln for ln in out_on.splitlines() if ln.startswith("frozen-prefix cache")]
    assert len(on_lines) == 1 and on_lines[0].startswith("frozen-prefix cache on")
    assert "text 1/2 blocks frozen" in on_lines[0] and "not cached: image" in on_lines[0]
    assert list((data / ".cache").glob("prefix-text-*/"))
    assert [ln for ln in out_off.splitlines() if ln.startswith("frozen-prefix cache")] == [
        "frozen-prefix cache off (data.prefix_cache=false): item encoders run whole every step"]

    def losses(rows):
        return [r["loss"] for r in rows if r.get("kind") == "train"]

    def final(rows, split):
        return [r for r in rows if r.get("kind") == "eval" and r["split"] == split][-1]

    assert len(losses(rows_on)) == 4
    assert losses(rows_on) == pytest.approx(losses(rows_off), rel=1e-4, abs=1e-4)
    for split in ("valid", "test"):
        on, off = final(rows_on, split), final(rows_off, split)
        assert on["users"] == off["users"] == 120
        for key in ("hr@10", "ndcg@10", "mrr"):
            assert on[key] == pytest.approx(off[key], abs=1e-3), (split, key)


@pytest.mark.slow
def test_loader_workers_carry_the_cache_for_both_modalities(tmp_path):
    """GPU presets train with loader workers: the cached activations of both modalities must cross
    the worker boundary (images would otherwise reach the encoder as 0x0 pixels, and text would
    silently run the whole encoder)."""
    data = synthesize(tmp_path / "data", domain="target", n_users=120, n_items=80, seed=3, seq_shard_size=40)
    both = ("data.num_workers=2", "model.image.trainable=1")
    out_on, rows_on = _train(tmp_path, data, "on", *both)
    _, rows_off = _train(tmp_path, data, "off", *both, "data.prefix_cache=false")
    line = [ln for ln in out_on.splitlines() if ln.startswith("frozen-prefix cache")]
    assert len(line) == 1 and line[0].startswith("frozen-prefix cache on"), line
    assert "text 1/2 blocks frozen" in line[0] and "not cached" not in line[0], line[0]
    on = [r["loss"] for r in rows_on if r.get("kind") == "train"]
    off = [r["loss"] for r in rows_off if r.get("kind") == "train"]
    assert len(on) == 4
    assert on == pytest.approx(off, rel=1e-4, abs=1e-4)
