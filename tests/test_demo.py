"""The one-command demo, in its reduced size, as a user runs it (a subprocess with a timeout)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.engine.consolidate import export_run
from transrec.models.export import read_export

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reduced_demo_prints_the_table_and_writes_plots(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "transrec.cli", "demo", "--out", str(out), "--size", "reduced"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "| mode | budget | tuned | trainable |" in text and "elapsed:" in text
    for mode in ("scratch", "full", "lora", "id-sasrec"):
        assert f"| {mode} |" in text
    summary = json.loads((out / "demo.json").read_text())
    budgets = summary["size"]["target_budgets"]
    rows = {r["mode"]: r for r in summary["rows"]}
    assert set(rows) == {"scratch", "full", "lora", "id-sasrec"}
    for r in rows.values():
        assert 0.0 <= r["test_ndcg@10"] <= r["test_hr@10"] <= 1.0
        assert r["steps"] == r["budget"] == budgets[0] and 1 <= r["eval_step"] <= budgets[0]
    # the budget curve: every mode at every budget, its table, the leader per budget, CSV and PNG
    curve = summary["budget_rows"]
    assert sorted((r["mode"], r["budget"]) for r in curve) == sorted(
        (m, b) for m in rows for b in budgets)
    assert all(r["steps"] == r["budget"] for r in curve)
    for protocol, key in (("masked", "masked_ndcg@10"), ("ranked", "ranked_ndcg@10")):
        leaders = [x for x in summary["leaders"] if x["protocol"] == protocol]
        assert [x["budget"] for x in leaders] == sorted(budgets)
        for x in leaders:  # the best row is always among the tied; a leader is alone beyond noise
            best = max(r[key] for r in curve if r["budget"] == x["budget"])
            top = [r[key] for r in curve if r["mode"] == x["tied"][0] and r["budget"] == x["budget"]]
            assert top == [best]
            assert x["leader"] in (None, x["tied"][0]) and (x["leader"] is None) == (len(x["tied"]) > 1)
    assert "test NDCG@10, history masked: " in text and "test NDCG@10, history ranked: " in text
    assert f"at {budgets[-1]} steps (best step; model.user.dropout)" in text and "[95% CI]" in text
    for r in curve:  # every mode, the ID baseline too, with the dropout its validation chose
        assert r["tuned"] in ("model.user.dropout=0.1", "model.user.dropout=0.5")
        assert [t["setting"] for t in r["tuning"]] == ["model.user.dropout=0.1", "model.user.dropout=0.5"]

    with open(out / "target" / "budget.csv") as f:
        assert len(list(csv.DictReader(f))) == len(curve)
    assert (out / "target" / "budget.png").stat().st_size > 10_000
    # LoRA trains a small fraction of what full fine-tuning trains.
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] / 2
    for png in (out / "target" / "compare.png", out / "pretrain.png"):
        assert png.stat().st_size > 10_000
    # The LoRA run's export is adapter-only and names the pretrained export as its base.
    exp = export_run(Path(rows["lora"]["runs"][0]), tmp_path / "lora-export")  # the tuned run
    meta = read_export(exp)
    assert meta["kind"] == "adapter" and Path(meta["base"]) == (out / "pretrained").resolve()
    full_size = (out / "pretrained" / "model.safetensors").stat().st_size
    assert (exp / "model.safetensors").stat().st_size < full_size / 2
