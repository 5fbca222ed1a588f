"""Every GPU preset's code path, on the CPU at toy sizes: what a preset switches on stays on.

The suite usually runs without a GPU, so a bug only a GPU run could show would go unseen. For each
GPU preset this trains a few steps on 2 gloo ranks through the command line, as a GPU run would, with

- the preset's loader workers (4 per rank, each owning sequence shards of its own);
- the frozen-prefix cache on for both modalities (top-2 blocks trained);
- DeepSpeed bf16, as the presets use (the model cast to bf16, fp32 master weights);
- ZeRO-2 and ZeRO-3;
- the preset's global negatives, an evaluation during training and the final one.

Only sizes change (title length, image size, batch, steps, and BERT-base -> the 4-layer text
preset, whose frozen prefix and trainable tail split the same way); the kernel's GPU configs are
compiled for sm_90 in the kernel tests.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from spawn_ranks import launch_ranks

from transrec.config import build_config
from transrec.shards.dataset import Dataset
from transrec.shards.synth import synthesize

WORLD, WORKERS, STEPS = 2, 4, 3
TOY = ["model.text.max_len=8", "model.image.image_size=32", "data.batch_size=16", "data.max_len=6",
       "model.user.max_len=6", f"optim.steps={STEPS}", "optim.warmup_steps=1", "eval.every=2",
       "eval.batch_size=32", "eval.item_chunk=64", "run.log_every=1", "run.progress=false",
       "run.tensorboard=false"]
SMALLER = {"small-gpu": [], "base-gpu": ["model.text.name=small"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = synthesize(tmp_path_factory.mktemp("gpu_presets") / "data", domain="source", n_users=160,
                      n_items=64, seed=3, max_len=12, seq_shard_size=16)
    n_shards = len(Dataset.open(path).seq_shards)
    assert n_shards >= WORLD * WORKERS, "every rank must get a shard per worker"
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=lambda s: f"zero{s}")
@pytest.mark.parametrize("preset", ["small-gpu", "base-gpu"])
def test_gpu_preset_trains_and_evaluates_on_cpu(preset, stage, data, tmp_path):
    cfg = build_config(preset)
    # the switches under test are the preset's own
    assert cfg.data.num_workers == WORKERS and cfg.deepspeed.precision == "bf16"
    assert cfg.data.prefix_cache and cfg.model.text.trainable == cfg.model.image.trainable == 2
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "transrec.cli", "train", "--data", str(data), "--out", str(run),
            "--preset", preset, f"deepspeed.zero_stage={stage}", *TOY, *SMALLER[preset]]
    ranks = launch_ranks(argv, WORLD, tmp_path, timeout=300)
    failed = [f"rank {r} exited with {code}: {log[-3000:]}"
              for r, (code, log) in enumerate(ranks) if code != 0]
    assert not failed, "\n\n".join(failed)
    log0 = ranks[0][1]
    line = [ln for ln in log0.splitlines() if ln.startswith("frozen-prefix cache")]
    assert len(line) == 1 and line[0].startswith("frozen-prefix cache on"), line
    assert "text " in line[0] and "image " in line[0] and "not cached" not in line[0], line[0]

    ds_cfg = json.loads((run / "deepspeed.json").read_text())
    assert ds_cfg["bf16"]["enabled"] and ds_cfg["zero_optimization"]["stage"] == stage
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["num_workers"] == WORKERS and saved["model"]["loss"]["negatives"] == "global"

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train), train
    evals = [(r["step"], r["split"]) for r in rows if r["kind"] == "eval"]
    assert evals == [(2, "valid"), (STEPS, "valid"), (STEPS, "test")]
    n_eval = sum(s.n_eval for s in Dataset.open(data).seq_shards)
    for r in rows:
        if r["kind"] == "eval":
            assert r["users"] == n_eval  # each evaluated user once over the ranks and workers
            assert all(0.0 <= r[k] <= 1.0 for k in ("hr@10", "ndcg@10", "mrr")), r
    assert (run / "eval.json").is_file()
    assert any(Path(run, "checkpoints").iterdir())
