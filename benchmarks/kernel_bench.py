"""Benchmark of the in-batch softmax (linear cross-entropy of q [N, D] against k [M, D], N = M = B).

GPU (default): providers transrec (this project's Triton kernels) / Liger-Kernel fused linear
cross-entropy / Cut Cross-Entropy (these two from the optional `bench` extra; a missing one is
skipped with the reason printed) / torch.compile / torch eager / this project's chunked torch path,
modes full / forward / backward, bf16, shapes (B, D) in (65536, 256), (32768, 256), (32768, 768),
(8192, 256) (that order: a run cut short keeps the target shapes). Median ms by
triton.testing.do_bench, extra peak memory over the inputs, TFLOP/s and the share of a bf16 matmul
measured in the same run. Rows are appended to benchmarks/results/kernels.csv with the machine stamp
(date, machine, versions, commit) and the device measured on; a PNG per card goes beside it.

    .venv/bin/python benchmarks/kernel_bench.py                      # GPU, everything
    .venv/bin/python benchmarks/kernel_bench.py --shapes 8192x256 --providers transrec,torch
    .venv/bin/python benchmarks/kernel_bench.py --cpu                # chunked vs eager on the CPU, seconds
    .venv/bin/python benchmarks/kernel_bench.py --dry-run            # the GPU code path on the CPU (tests)
    .venv/bin/python benchmarks/kernel_bench.py --sweep              # GPU: the design sweep (below)

The design sweep (``--sweep``, what ``benchmarks/gpu_proof.sh --only env,ksweep`` runs) picks between
the kernel designs of ``kernels/triton_config.py`` on a card: per shape, this project's kernel once
per design (providers "transrec" as the dispatcher runs it, "transrec:fused" and "transrec:split",
modes full / forward / backward), then
every kernel stage alone (fwd: forward with the dQ accumulator; lse: forward without it; bwd: the dK
pass; dq: the dQ pass) at every config of its table, pinned (providers "stage:<stage>", mode
"stage", the config in the note). Each stage config is checked against the float32 reference at
the check shape before it is timed, as every provider is. From those rows: DESIGN per D class (fused
if fwd + bwd beats lse + bwd + dq) and each table's order or its pruning.

Split-M in the sweep (kernels/triton_config.py, SPLIT_DEFAULT): where the unsplit kernels leave the
card underfilled (8192^2 x 256: 128 programs of 64 rows on 132 SMs), providers
"transrec:<design>:<split>" (split "auto" = the SM-count heuristic, or a forced S: "transrec:split:2",
":4"), and stage rows of the lse / dq / bwd stages for each ``--splits`` value (default auto,2) that
cuts the shape into more than one chunk ("S<n>" after the config in the note). From those rows:
SPLIT_DEFAULT and the heuristic's constants.

Before a provider is timed, its loss and gradients at 1024^2 are compared with the float32 reference
(the max relative error goes into the row's note; MISMATCH marks a disagreement). A provider that
fails is recorded as such and the run goes on; rows are appended as they are measured.

FLOPs (useful work, whatever an implementation recomputes): forward 2*N*M*D (the logits), backward
4*N*M*D (dQ = dS K and dK = dS^T Q), full 6*N*M*D.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import append_rows, stamp, stamped  # noqa: E402  (benchmarks/ is the script folder)

from transrec.kernels import inbatch_softmax, inbatch_softmax_reference
from transrec.kernels.triton_config import (
    DESIGNS,
    config_kwargs,
    d_class,
    d_layout,
    interpreting,
    num_splits,
    sm_count,
    split_mode,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Target shapes first, this project's kernel first, forward+backward first: a run cut short by its
# time limit keeps the figures that matter most (rows are written as they are measured).
GPU_SHAPES = [(65536, 256), (32768, 256), (32768, 768), (8192, 256)]
CPU_SHAPES = [(1024, 64), (4096, 64), (4096, 256)]
PROVIDERS = ["transrec", "liger", "cce", "compile", "torch", "chunked"]  # chunked: this project's torch path
# --sweep: this project's kernel as the dispatcher runs it, then once per design, then split-M variants
# ("transrec:<design>:<split>", triton_config.split_mode; timed only where the card is underfilled)
DESIGN_PROVIDERS = ["transrec", "transrec:fused", "transrec:split", "transrec:split:auto", "transrec:split:2",
                    "transrec:split:4", "transrec:fused:auto"]
STAGE_FLOPS = {"fwd": 4, "lse": 2, "bwd": 4, "dq": 4}  # x N*M*D: the useful work each stage does
MODES = ["full", "forward", "backward"]
TAU = 0.05
# after the machine stamp's columns (bench_common.stamped); device: the card, or the CPU
FIELDS = ["device", "provider", "mode", "n", "m", "d", "dtype", "ms_median", "ms_p20",
          "ms_p80", "extra_gib", "tflops", "flop_formula", "matmul_peak_tflops", "peak_share", "note"]


NOTES = {"cce": "bias as an extra embedding column (D+8); CCE's default gradient filter",
         "liger": "temperature folded into q"}


def flops(mode, n, m, d):
    return {"forward": 2, "backward": 4, "full": 6, **STAGE_FLOPS}[mode] * n * m * d


FLOP_FORMULA = {"forward": "2*N*M*D", "backward": "4*N*M*D", "full": "6*N*M*D",
                **{s: f"{x}*N*M*D" for s, x in STAGE_FLOPS.items()}}


def make_inputs(n, m, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = F.normalize(torch.randn(m, d, generator=g), dim=1)
    t = torch.randint(0, m, (n,), generator=g)
    q = F.normalize(k[t] + 0.5 * torch.randn(n, d, generator=g), dim=1)
    pop = 1.0 / torch.arange(1, m + 1, dtype=torch.float64) ** 0.9
    b = (-torch.log(pop / pop.sum()))[torch.randperm(m, generator=g)].float()
    return (q.to(device, dtype).requires_grad_(True), k.to(device, dtype).requires_grad_(True),
            t.to(device), b.to(device))


# ----- providers: each returns fn(q, k, t, b) -> scalar loss (mean over rows), or raises Skip -----
class Skip(Exception):
    pass


def eager_loss(q, k, t, b):
    logits = (q @ k.T) / TAU + b.to(q.dtype)
    return F.cross_entropy(logits, t)


def provider(name):
    if name == "transrec":
        return lambda q, k, t, b: inbatch_softmax(q, k, t, bias=b, temperature=TAU, impl="auto")
    if name.startswith("transrec:"):  # one design of the Triton kernels (and split-M), whatever DESIGN says
        from transrec.kernels.triton_op import inbatch_softmax_triton_rows  # optional: triton

        design, split = (name.split(":", 2) + [None])[1:3]
        if design not in DESIGNS:
            raise ValueError(f"unknown design {design!r} in provider {name!r} (designs: {DESIGNS})")
        split = split_mode(split or "off")  # unsplit unless named: the design alone
        return lambda q, k, t, b: inbatch_softmax_triton_rows(q, k, t, bias=b, temperature=TAU,
                                                              design=design, split=split).mean()
    if name == "chunked":
        return lambda q, k, t, b: inbatch_softmax(q, k, t, bias=b, temperature=TAU, impl="chunked")
    if name == "torch":
        return eager_loss
    if name == "compile":
        return torch.compile(eager_loss, dynamic=False)
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional: liger_kernel
        except ImportError as e:
            raise Skip(f"liger-kernel not installed ({e}); pip install '.[bench]'") from None
        lce = LigerFusedLinearCrossEntropyLoss()
        # Temperature folded into q; the per-class bias is Liger's `bias` argument.
        return lambda q, k, t, b: lce(k, q * (1.0 / TAU), t, b.to(q.dtype))
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy  # optional: cut_cross_entropy (bench extra)
        except ImportError as e:
            raise Skip(f"cut-cross-entropy not installed ({e}); pip install '.[bench]'") from None

        def cce(q, k, t, b):
            # Its API has no bias: the bias rides as one more embedding column (1 on the q side, b on
            # the k side), padded with zeros to D + 8 columns (+8/D flops, noted in the CSV rows).
            n, m = q.shape[0], k.shape[0]
            e = torch.cat([q * (1.0 / TAU), q.new_ones(n, 1), q.new_zeros(n, 7)], dim=1)
            c = torch.cat([k, b.to(k.dtype)[:, None], k.new_zeros(m, 7)], dim=1)
            return linear_cross_entropy(e, c, t)
        return cce
    raise ValueError(f"unknown provider {name!r}")


# ----- agreement: a provider is timed only after it computed the same loss and gradients -----
CHECK_N = 1024


def agreement(fn, d, dtype, device):
    """Largest relative error (max |x - ref| / max |ref|) of the loss, dq and dk of ``fn`` against the
    float32 reference on the same inputs (N = M = CHECK_N; D as in the timed shape)."""
    q, k, t, b = make_inputs(CHECK_N, CHECK_N, d, dtype, device, seed=1)
    loss = fn(q, k, t, b)
    loss.backward()
    got = [loss.detach().float(), q.grad.float(), k.grad.float()]
    q32, k32 = (x.detach().float().requires_grad_(True) for x in (q, k))
    ref = inbatch_softmax_reference(q32, k32, t, bias=b.float(), temperature=TAU)
    ref.backward()
    want = [ref.detach(), q32.grad, k32.grad]
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)) for g, w in zip(got, want))


AGREE_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----- GPU -----
class Cuda:
    """What the GPU run needs from the device: timing by triton.testing.do_bench (median, p20, p80),
    the allocator's peak memory, a measured bf16 matmul peak."""

    dtype = torch.bfloat16
    device = "cuda"
    oom = torch.cuda.OutOfMemoryError

    def name(self):
        return torch.cuda.get_device_name()

    def matmul_peak_tflops(self):
        import triton.testing  # optional: triton (GPU timing)

        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
        return 2 * 8192**3 / (ms * 1e-3) / 1e12

    def sync(self):
        torch.cuda.synchronize()

    def allocated(self):
        return torch.cuda.memory_allocated()

    def reset_peak(self):
        torch.cuda.reset_peak_memory_stats()

    def max_allocated(self):
        return torch.cuda.max_memory_allocated()

    def bench(self, run, grad_to_none):
        import triton.testing  # optional: triton (GPU timing)

        return triton.testing.do_bench(run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8],
                                       grad_to_none=grad_to_none)

    def empty_cache(self):
        torch.cuda.empty_cache()


class DryRun(Cuda):
    """The GPU run's code path on the CPU (tiny shapes, for tests): wall-clock timing, no memory
    figures. Its numbers mean nothing; that the loop, the checks and the CSV work does."""

    device = "cpu"
    oom = MemoryError

    def name(self):
        return "dry-run:cpu"

    def matmul_peak_tflops(self):
        a = torch.randn(256, 256, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        a @ a
        return 2 * 256**3 / max(time.perf_counter() - t0, 1e-9) / 1e12

    def sync(self):
        pass

    def allocated(self):
        return 0

    reset_peak = sync

    max_allocated = allocated

    def bench(self, run, grad_to_none):
        times = []
        for _ in range(3):
            for x in grad_to_none:
                x.grad = None
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1], min(times), max(times)

    empty_cache = sync


def bench_one(dev, fn, mode, n, m, d):
    q, k, t, b = make_inputs(n, m, d, dev.dtype, dev.device)
    dev.sync()
    base = dev.allocated()
    loss = fn(q, k, t, b)  # warm-up / compile / autotune
    loss.backward()
    q.grad = k.grad = None
    dev.sync()
    dev.reset_peak()
    if mode == "forward":  # with inputs that need grad, as in training (Liger computes grads here)
        run = lambda: fn(q, k, t, b)
    elif mode == "backward":
        held = fn(q, k, t, b)
        run = lambda: held.backward(retain_graph=True)
    else:
        run = lambda: fn(q, k, t, b).backward()
    run()
    dev.sync()
    extra = (dev.max_allocated() - base) / 2**30
    ms = dev.bench(run, grad_to_none=[q, k])
    return ms, extra


# Compiling torch eager is the same function as torch eager (checked): its check would only add a
# compilation at the check's shape.
UNCHECKED = {"compile": "same function as torch"}


def run_gpu(args, dev=None):
    dev = dev or Cuda()
    card = dev.name()
    emit = Sink(args.out, card)
    peak = dev.matmul_peak_tflops()
    print(f"card: {card}; torch {torch.__version__}; bf16 matmul 8192^3 measured: {peak:.0f} TFLOP/s")
    print(f"temperature {TAU}, bias = -log(Zipf popularity), targets = planted near-duplicates")
    for n, d in args.shapes:
        m = n
        print(f"\n== B = N = M = {n}, D = {d}, bf16 ==")
        print(f"{'provider':10} {'mode':9} {'ms (median)':>12} {'p20-p80':>15} {'extra GiB':>10} "
              f"{'TFLOP/s':>8} {'of peak':>8}")
        for name in args.providers:
            if split_of(name) is not None and not underfilled(dev, n, m, d):
                print(f"{name:10} skipped: the unsplit kernels fill the card at this shape")
                continue
            try:
                fn = provider(name)
                if name in UNCHECKED:
                    check = UNCHECKED[name]
                else:
                    err = agreement(fn, d, dev.dtype, dev.device)
                    ok = err <= AGREE_TOL[dev.dtype]
                    check = f"rel err {err:.1e}" + ("" if ok else " MISMATCH")
                    print(f"{name:10} agreement with the fp32 reference at {CHECK_N}^2x{d}: max rel err "
                          f"{err:.2e}{'' if ok else '  MISMATCH: its figures are marked in the CSV'}")
            except Skip as e:
                print(f"{name:10} skipped: {e}")
                continue
            except Exception as e:  # noqa: BLE001 (one provider's failure must not end a one-shot run)
                print(f"{name:10} failed its check: {type(e).__name__}: {str(e)[:300]}")
                dev.empty_cache()
                continue
            for mode in args.modes:
                note = "; ".join(x for x in (NOTES.get(name, ""), check) if x)
                try:
                    (med, p20, p80), extra = bench_one(dev, fn, mode, n, m, d)
                except Skip as e:
                    print(f"{name:10} skipped: {e}")
                    break
                except dev.oom:
                    med = p20 = p80 = extra = float("nan")
                    note = "out of memory"  # replaces the provider's note: no figure to qualify
                except Exception as e:  # noqa: BLE001
                    med = p20 = p80 = extra = float("nan")
                    note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                dev.empty_cache()
                tf = flops(mode, n, m, d) / (med * 1e-3) / 1e12
                print(f"{name:10} {mode:9} {med:12.3f} {p20:7.2f}-{p80:<7.2f} {extra:10.3f} {tf:8.0f} "
                      f"{tf / peak:8.1%} {note}")
                emit(dict(provider=name, mode=mode, n=n, m=m, d=d, dtype=DTYPE_NAMES[dev.dtype],
                          ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}",
                          extra_gib=f"{extra:.4f}", tflops=f"{tf:.1f}", flop_formula=FLOP_FORMULA[mode],
                          matmul_peak_tflops=f"{peak:.0f}", peak_share=f"{tf / peak:.3f}", note=note))
        if args.stages:
            stage_sweep(dev, emit, n, m, d, peak, args.check_n, args.splits)
        if emit.rows:  # redrawn after every shape, so a run cut short still leaves its plot
            plot(card, emit.rows, args.out)
    print(f"\n{len(emit.rows)} rows appended to {emit.path}")


# ----- the kernel stages alone, per config of their tables (--sweep) -----
STAGES = ("fwd", "lse", "bwd", "dq")


def stage_launch(stage, q, k, b, t, lse2, g, row, split="off"):
    """The launch of one stage with the tiles, warps and stages of table row ``row`` (pinned), split-M
    as ``split`` says (not the fused forward), and its outputs: fwd (loss, lse2, A), lse (loss, lse2,
    None), bwd (dk, db), dq dq."""
    from transrec.kernels.triton_backward import backward_dk_launch, backward_dq_launch  # optional: triton
    from transrec.kernels.triton_forward import forward_launch  # optional: triton

    tiles = dict(block_m=row[0], block_n=row[1], resident=row[4], split=split)
    if stage in ("fwd", "lse"):
        launch, outs = forward_launch(q, k, b, t, TAU, stage == "fwd", **tiles)
    elif stage == "bwd":
        launch, outs = backward_dk_launch(q, k, b, t, lse2, g, TAU, True, True, **tiles)
    else:
        launch, outs = backward_dq_launch(q, k, b, t, lse2, g, TAU, **tiles)
    if not interpreting():  # the exact row: pinning alone takes the first row with these tiles
        kw = config_kwargs(row)
        launch.kwargs.update(num_warps=kw["num_warps"], num_stages=kw["num_stages"])
    return launch, outs


def stage_inputs(n, m, d, dtype, device, seed=0):
    """(q, k, bias, target) as the launchers take them (canonical), the float32 row LSE (log2 domain)
    and g = 1 (the gradient of a sum)."""
    from transrec.kernels.triton_op import canonical_inputs  # optional: triton

    q, k, t, b = make_inputs(n, m, d, dtype, device, seed=seed)
    q, k, t, b = canonical_inputs(q.detach(), k.detach(), t, b)
    with torch.no_grad():
        logits = (q.float() @ k.float().T) / TAU + b[None, :] if n * m <= 2**22 else None
    if logits is not None:
        lse2 = torch.logsumexp(logits, 1) * 1.4426950408889634
    else:  # the timed shapes: the kernel's own forward (the values barely matter for the timing)
        from transrec.kernels.triton_forward import triton_forward  # optional: triton

        lse2 = triton_forward(q, k, b, t, TAU, False)[1]
    return q, k, b, t, lse2.float().contiguous(), torch.ones(n, device=q.device)


def stage_reference(q, k, b, t):
    """Float32 reference of what each stage computes: per-row loss, dq, dk, db of the summed loss."""
    q32, k32, b32 = (x.detach().float().requires_grad_(True) for x in (q, k, b))
    rows = inbatch_softmax_reference(q32, k32, t, bias=b32, temperature=TAU, reduction="none")
    dq, dk, db = torch.autograd.grad(rows.sum(), [q32, k32, b32])
    return dict(loss=rows.detach(), dq=dq, dk=dk, db=db)


def stage_outputs(stage, outs):
    """The stage's outputs by the reference's names (fwd's A is tau * dq for g = 1)."""
    if stage == "fwd":
        return dict(loss=outs[0], dq=outs[2] / TAU)
    if stage == "lse":
        return dict(loss=outs[0])
    if stage == "bwd":
        return dict(dk=outs[0], db=outs[1])
    return dict(dq=outs)


def stage_sweep(dev, emit, n, m, d, peak, check_n, splits=()):
    """Each stage at each config of its table: checked at check_n^2 x d, then timed at n x m x d; then
    the split-M launches of the LSE forward and of both backward passes, per config, for each of
    ``splits`` ("auto" or an S) that cuts this shape into more than one chunk (the S is in the note)."""
    dclass = d_class(*d_layout(d)[:2])
    itemsize = torch.tensor([], dtype=dev.dtype).element_size()
    print(f"-- stages alone at {n}x{m}x{d} (D class {dclass}), each config of its table, pinned --")
    chk = stage_inputs(check_n, check_n, d, dev.dtype, dev.device, seed=1)
    ref = stage_reference(*chk[:4])
    timed = stage_inputs(n, m, d, dev.dtype, dev.device)
    for stage in STAGES:
        for row in table(stage, dclass, itemsize):
            done = set()
            for split in ["off", *(() if stage == "fwd" else splits)]:
                cfg = f"{row[0]}x{row[1]} w{row[2]} s{row[3]} r{int(row[4])}"
                if split != "off":  # the S this shape gets; the check runs with the same S
                    s_ = stage_launch(stage, *timed, row, split=split)[0].grid[1]
                    if s_ == 1 or s_ in done:
                        continue
                    done.add(s_)
                    split, cfg = s_, f"{cfg} S{s_}"
                stage_row(dev, emit, stage, row, cfg, split, chk, ref, timed, n, m, d, peak)


def stage_row(dev, emit, stage, row, cfg, split, chk, ref, timed, n, m, d, peak):
    try:
        launch, outs = stage_launch(stage, *chk, row, split=split)
        launch()
        got = stage_outputs(stage, outs)
        err = max(float((got[x].float() - ref[x]).abs().max() / ref[x].abs().max().clamp_min(1e-30))
                  for x in got)
        ok = err <= AGREE_TOL[dev.dtype]
        note = f"config {cfg}; rel err {err:.1e}" + ("" if ok else " MISMATCH")
        launch, _ = stage_launch(stage, *timed, row, split=split)
        launch()  # compile
        dev.sync()
        med, p20, p80 = dev.bench(launch, grad_to_none=[])
    except Exception as e:  # noqa: BLE001 (one config's failure must not end the sweep)
        med = p20 = p80 = float("nan")
        why = str(e).splitlines()[0][:120] if str(e) else ""
        note = f"config {cfg}; failed: {type(e).__name__}: {why}"
    dev.empty_cache()
    tf = flops(stage, n, m, d) / (med * 1e-3) / 1e12
    print(f"stage:{stage:5} {cfg:22} {med:10.3f} ms {tf:8.0f} TFLOP/s {tf / peak:7.1%} {note}")
    emit(dict(provider=f"stage:{stage}", mode="stage", n=n, m=m, d=d, dtype=DTYPE_NAMES[dev.dtype],
              ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", extra_gib="",
              tflops=f"{tf:.1f}", flop_formula=FLOP_FORMULA[stage], matmul_peak_tflops=f"{peak:.0f}",
              peak_share=f"{tf / peak:.3f}", note=note))


def split_of(name):
    """The split-M part of a provider name ("transrec:split:2" -> "2"), None for the others."""
    parts = name.split(":")
    return parts[2] if parts[0] == "transrec" and len(parts) > 2 else None


def underfilled(dev, n, m, d):
    """Whether the LSE forward's programs at this shape leave the card underfilled (split-M's case:
    triton_config.num_splits "auto" > 1 for the first row of the lse table); always on the dry run."""
    if isinstance(dev, DryRun):
        return True
    row = table("lse", d_class(*d_layout(d)[:2]), torch.tensor([], dtype=dev.dtype).element_size())[0]
    return num_splits("auto", n, m, row[0], row[1], sms=sm_count(torch.device(dev.device))) > 1


# ----- CPU -----
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_extra_gib(run):
    """Peak resident memory over the resident memory before ``run`` (Linux: clear_refs resets VmHWM)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so reuse does not hide growth
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    run()
    return (_rss_kib("VmHWM") - before) / 2**20


def run_cpu(args):
    torch.manual_seed(0)
    print(f"machine: {stamp()['machine']}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          "fp32; full = forward+backward")
    print(f"{'provider':10} {'N=M':>6} {'D':>5} {'ms (median of 3)':>17} {'extra GiB':>10} {'GFLOP/s':>8}")
    emit = Sink(args.out, "cpu")
    for n, d in args.shapes:
        for name in ("chunked", "torch"):
            fn = provider(name)
            err = agreement(fn, d, torch.float32, "cpu")
            if err > AGREE_TOL[torch.float32]:
                raise SystemExit(f"{name} disagrees with the reference at {CHECK_N}^2x{d}: "
                                 f"max rel err {err:.2e}")
            q, k, t, b = make_inputs(n, n, d, torch.float32, "cpu")

            def run(fn=fn, q=q, k=k, t=t, b=b):
                fn(q, k, t, b).backward()
                q.grad = k.grad = None

            run()
            extra = cpu_extra_gib(run)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
            med = statistics.median(times)
            gf = flops("full", n, n, d) / (med * 1e-3) / 1e9
            print(f"{name:10} {n:6d} {d:5d} {med:17.1f} {extra:10.4f} {gf:8.1f}")
            emit(dict(provider=name, mode="full", n=n, m=n, d=d, dtype="fp32", ms_median=f"{med:.3f}",
                             ms_p20=f"{min(times):.3f}", ms_p80=f"{max(times):.3f}", extra_gib=f"{extra:.4f}",
                             tflops=f"{gf / 1e3:.4f}", flop_formula=FLOP_FORMULA["full"],
                             matmul_peak_tflops="", peak_share="", note=f"rel err {err:.1e}"))
    print(f"\n{len(emit.rows)} rows appended to {emit.path}")


class Sink:
    """Appends each row to ``out``/kernels.csv as soon as it is measured (a run cut short by a time
    limit keeps what it measured) and remembers them for the plot."""

    def __init__(self, out: Path, device: str):
        self.path = out / "kernels.csv"
        self.stamp = {**stamp(), "device": device}
        self.rows = []

    def __call__(self, row: dict):
        self.rows.append(row)
        append_rows(self.path, [{**self.stamp, **row}], stamped(FIELDS))


def plot(machine, rows, out: Path):
    import matplotlib  # lazy: matplotlib only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    measured = lambda r: float(r["ms_median"]) == float(r["ms_median"])  # not nan (failed, out of memory)
    full = [r for r in rows if r["mode"] == "full" and measured(r)]
    shapes = sorted({(r["n"], r["d"]) for r in full})
    provs = list(dict.fromkeys(r["provider"] for r in full))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        for ax, key in zip(axes, ("ms_median", "extra_gib")):
            vals = [next((float(r[key]) for r in full if r["provider"] == p and (r["n"], r["d"]) == s),
                         float("nan")) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
    for ax, key, title in zip(axes, ("ms_median", "extra_gib"),
                              ("forward+backward, median ms", "extra peak memory, GiB")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"{n}²×{d}" for n, d in shapes])
        ax.set_title(title)
        if all(float(r[key]) > 0 for r in full):  # eager and the fused kernels differ by 100x and more
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"in-batch softmax, bf16, {machine}")
    fig.tight_layout()
    name = "kernels_" + "".join(c if c.isalnum() else "_" for c in machine).strip("_") + ".png"
    fig.savefig(out / name, dpi=120)
    print(f"plot: {out / name}")


def parse_shape(s):
    n, d = s.lower().split("x")
    return int(n), int(d)


def main(argv=None):
    global CHECK_N  # --check-n: the providers' check (agreement) reads the module's figure
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="chunked vs eager torch on the CPU (small shapes)")
    ap.add_argument("--shapes", type=lambda s: [parse_shape(x) for x in s.split(",")], default=None,
                    help="comma-separated BxD, e.g. 8192x256,32768x768")
    ap.add_argument("--providers", type=lambda s: s.split(","), default=PROVIDERS)
    ap.add_argument("--modes", type=lambda s: s.split(","), default=MODES)
    ap.add_argument("--dry-run", action="store_true",
                    help="the GPU run's code path on the CPU at tiny shapes (meaningless figures; for tests)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and the PNG")
    ap.add_argument("--sweep", action="store_true",
                    help="the design sweep: providers transrec:fused,transrec:split, every mode, then each "
                         "kernel stage alone at every config of its table (--providers/--modes still apply)")
    ap.add_argument("--stages", action="store_true",
                    help="time each kernel stage per table config (--sweep does)")
    ap.add_argument("--check-n", type=int, default=None, help="N = M of the agreement check (default 1024)")
    ap.add_argument("--splits", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="split-M values (auto or S) the stage sweep adds where they split the shape "
                         "(default with --sweep: auto,2; 'none' for none)")
    args = ap.parse_args(argv)
    CHECK_N = args.check_n = args.check_n or CHECK_N
    if args.splits is None:
        args.splits = ["auto", "2"] if args.sweep else []
    args.splits = [x for x in args.splits if x != "none"]
    if args.sweep:
        args.stages = True
        if args.providers == PROVIDERS:
            args.providers = DESIGN_PROVIDERS
    if args.cpu:
        args.shapes = args.shapes or CPU_SHAPES
        run_cpu(args)
        return 0
    if args.dry_run:
        args.shapes = args.shapes or [(96, 16)]
        run_gpu(args, DryRun())
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: use --cpu for the CPU comparison", file=sys.stderr)
        return 2
    args.shapes = args.shapes or GPU_SHAPES
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
