"""``transrec bench``: the parts of a step add up to the step, the counted FLOPs agree with the
formulas, dedup's ablation goes the right way, rows round-trip through --compare, and 1 and 2
gloo ranks measure the same global work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transrec.cli import main
from transrec.config.model import UserEncoderConfig
from transrec.engine import bench, hardware
from transrec.engine.flops import model_flop_counter, user_encoder_flops
from transrec.engine.stepclock import PARTS, StepClock
from transrec.models.user import UserEncoder
from transrec.shards.synth import synthesize

pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest

SMALL = ["model.user.layers=1", "model.text.max_len=12", "data.max_len=8", "model.user.max_len=8"]


@pytest.fixture(scope="module")
def text_world(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("bench") / "text", n_users=300, n_items=120, image_frac=0.0,
                      seed=3, min_len=3, max_len=12)


@pytest.fixture(scope="module")
def mixed_world(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("bench") / "mixed", n_users=600, n_items=300, seed=4,
                      min_len=3, max_len=14)


def measure(preset, data, out, *overrides, steps=3, warmup=1, dedup=True, label="x"):
    cfg = bench.bench_config(preset, None, [*SMALL, *overrides], data=str(data), run=Path(out),
                             warmup=warmup, steps=steps)
    return bench.measure(cfg, warmup=warmup, steps=steps, label=label, dedup=dedup)


@pytest.fixture(scope="module")
def text_row(text_world, tmp_path_factory):
    return measure("tiny", text_world, tmp_path_factory.mktemp("bench") / "run", "data.batch_size=24")


# ----------------------------------------------------------------------------- the step clock

def test_clock_counts_exclusive_time():
    """A child's time is not its parent's; the parent resumes when the child ends."""
    clock = StepClock("cpu")
    ticks = iter([0.0, 1.0, 3.0, 4.0, 10.0, 12.0, 13.0, 14.0])
    clock._now = lambda: next(ticks)
    with clock("backward"):
        with clock("communication"):
            pass
    with clock("optimizer"):
        pass
    assert dict(clock.totals) == {"backward": 2.0, "communication": 2.0, "optimizer": 2.0}
    with pytest.raises(RuntimeError, match="closed while"):
        clock.enter("a")
        clock.exit("b")


def test_parts_add_up_to_the_step(text_row):
    r = text_row
    assert abs(r["parts_sum_ms"] - r["breakdown_step_ms"]) <= 0.10 * r["breakdown_step_ms"], r
    for part in ("data", "item_encoding", "user_encoder", "loss", "backward", "optimizer"):
        assert r[f"{part}_ms"] > 0, (part, r)
    assert r["communication_ms"] == 0 and r["world"] == 1  # one rank: no collective runs... below
    assert set(f"{p}_ms" for p in PARTS) <= set(r)
    assert r["seq_per_s"] > 0 and r["text_tokens_per_s"] > 0 and r["images_per_s"] == 0
    assert r["rss_mib"] > 0 and r["commit"] and r["machine"]


# ----------------------------------------------------------------------------- FLOPs

def test_counted_flops_match_the_formula_text_model(text_row):
    """BERT-family text encoder (embeddings frozen, both blocks trained) + user encoder + in-batch
    softmax; the only work without a formula is the image encoder's two-image dummy (ZeRO-3's
    uniform module set), well under 2 %."""
    counted, formula = text_row["flops_per_step"], text_row["flops_formula_per_step"]
    assert formula, text_row
    assert abs(counted - formula) <= 0.02 * counted, (counted, formula)


def test_counted_flops_match_the_formula_id_model(text_world, tmp_path):
    """The ID model with a softmax over its whole table (the sasrec preset, causal): exact."""
    r = measure("sasrec", text_world, tmp_path / "run", "data.batch_size=32", steps=1, warmup=0)
    assert r["flops_formula_per_step"] and abs(r["flops_per_step"] - r["flops_formula_per_step"]) <= \
        0.02 * r["flops_per_step"], r
    assert r["dedup"] == "n/a (ID model)"


@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_user_encoder_formula_is_the_counters(kind):
    """The formula alone against the counter on the bare user encoder (odd sizes; no padding, so
    the CPU picks its flash attention kernel, which the counter learns from the project)."""
    cfg = UserEncoderConfig(kind=kind, layers=3, heads=3, max_len=9, dropout=0.0)
    enc = UserEncoder(cfg, 48)
    x = torch.randn(5, 7, 48, requires_grad=True)
    mask = torch.ones(5, 7, dtype=torch.bool)
    with model_flop_counter() as fc:
        enc(x, mask).sum().backward()
    assert fc.get_total_flops() == user_encoder_flops(enc, 5, 7, 48)


# ----------------------------------------------------------------------------- ablation, compare

def test_dedup_ablation_has_the_right_sign_at_batch_256(mixed_world, tmp_path):
    """Without dedup every position's item is encoded: more FLOPs a step for the same sequences,
    and the command's ratio says what dedup buys (printed; the speed itself is a benchmark's)."""
    out = tmp_path / "b"
    code = main(["bench", "--preset", "tiny", "--data", str(mixed_world), "--out", str(out), "--warmup", "1",
                 "--steps", "2", "--ablate", "dedup,bf16", "data.batch_size=256", *SMALL])
    assert code == 0
    rows = bench.read_rows(out / "bench.json")
    full, off = rows
    assert full["dedup"] is True and off["dedup"] is False and off["label"] == "tiny -dedup"
    assert off["flops_per_step"] > 1.3 * full["flops_per_step"], (full, off)
    assert off["item_encoding_ms"] > 0 and "full engine is" in off["note"]
    assert (out / "bench.md").read_text().count("| tiny") == 2


def test_compare_round_trips_the_json(text_row, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    bench.write_outputs(a, [text_row], ["transrec", "bench"])
    faster = dict(text_row, seq_per_s=2 * text_row["seq_per_s"], step_ms=text_row["step_ms"] / 2)
    bench.write_outputs(b, [faster], ["transrec", "bench"])
    assert bench.read_rows(a / "bench.json") == json.loads(json.dumps([text_row]))
    capsys.readouterr()
    assert main(["bench", "--compare", str(a / "bench.json"), str(b / "bench.json")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("| x |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["2.00x", "0.50x", "1.00x", "1.00x"], line  # seq/s, step, TFLOP/s, MFU


@pytest.mark.parametrize("argv, message", [
    (["--synth", "12"], "--synth takes USERS,ITEMS"),
    (["--synth", "100,100", "--ablate", "dedup,warp"], "--ablate warp: unknown switch"),
    (["--synth", "100,100", "--sweep", "data.batch_size"], "--sweep takes KEY=V1,V2"),
    ([], "--data DATASET or --synth USERS,ITEMS"),
    (["--compare", "nowhere-a.json", "nowhere-b.json"], "nowhere-a.json: no such file"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- hardware

def test_known_gpu_peaks_and_unknown_ones():
    assert hardware.gpu_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4)
    assert hardware.gpu_peak("NVIDIA H100 PCIe", "bf16")[0] == pytest.approx(756.0)
    assert hardware.gpu_peak("NVIDIA A100-SXM4-80GB", "bf16")[0] == pytest.approx(312.0)
    assert hardware.gpu_peak("NVIDIA L4", "bf16")[0] == pytest.approx(121.0)
    assert hardware.gpu_peak("Tesla T4", "bf16") is None  # no bf16 on that card: no made-up figure
    assert hardware.gpu_peak("Some Future GPU", "bf16") is None
    probe = hardware.cpu_matmul_peak(n=128, seconds=0.05)
    assert probe["tflops"] > 0 and probe["source"].startswith("measured")


# ----------------------------------------------------------------------------- several ranks

@pytest.mark.slow
def test_world_sweep_one_and_two_gloo_ranks(text_world, tmp_path):
    """torchrun with 1 and 2 CPU ranks: FLOPs of every rank summed, collectives timed as
    communication, the scaling efficiency reported."""
    out = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "transrec.cli", "bench", "--preset", "tiny",
                           "--data", str(text_world),
                           "--out", str(out), "--warmup", "1", "--steps", "2", "--sweep", "world=1,2",
                           "data.batch_size=24", *SMALL], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = bench.read_rows(out / "bench.json")
    assert (one["world"], two["world"]) == (1, 2)
    assert one["communication_ms"] == 0 < two["communication_ms"] and 0 < two["comm_share"] < 1
    for r in (one, two):  # every rank counted and summed: the formula over both ranks' batches agrees
        assert abs(r["flops_per_step"] - r["flops_formula_per_step"]) <= 0.02 * r["flops_per_step"], r
    # the same global batch; each rank deduplicates its own half, so items both halves hold are
    # encoded twice: more work than one rank, never twice as much
    assert one["flops_per_step"] <= two["flops_per_step"] < 2 * one["flops_per_step"]
    assert two["rank_skew"] >= 1.0 and one["scaling_efficiency"] == pytest.approx(1.0)
    assert two["scaling_efficiency"] > 0 and (out / "bench_sweep.png").stat().st_size > 0
