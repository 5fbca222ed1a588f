"""What a measurement ran on, and how fast that hardware can multiply matrices.

:func:`machine_stamp` is the one description every benchmark row carries: the processor (model
name and cores), the GPU (name, driver, count) where there is one, the versions of the libraries
that set the speed, and the commit under one column name (``commit``).

:func:`device_peak` is the denominator of model FLOPs utilisation (MFU): a GPU's published dense
peak for the precision a run trains in (:data:`GPU_PEAKS`, from the vendors' datasheets, tensor
cores without sparsity), or, on a CPU, a peak measured by a matmul probe (:func:`cpu_matmul_peak`),
labelled as measured. A GPU the table does not know gets no MFU rather than a guess.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense peaks in TFLOP/s per GPU: (name fragment, {precision: peak}, source). The first fragment
# found in torch.cuda.get_device_name() wins, so the more specific names come first. "fp32" is the
# plain FP32 rate (CUDA cores); "tf32" applies where torch lets fp32 matmuls use TF32 tensor cores.
GPU_PEAKS: tuple[tuple[str, dict[str, float], str], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
     "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column (sparsity figures halved)"),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
     "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column (sparsity figures halved)"),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
     "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (sparsity figures halved)"),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
     "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (sparsity figures halved)"),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
     "NVIDIA A100 Tensor Core GPU datasheet (dense)"),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
     "NVIDIA L40S datasheet (sparsity figures halved)"),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
     "NVIDIA L4 Tensor Core GPU datasheet (sparsity figures halved)"),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
     "NVIDIA A10 Tensor Core GPU datasheet (sparsity figures halved)"),
    ("V100", {"fp16": 125.0, "fp32": 15.7}, "NVIDIA V100 Tensor Core GPU datasheet, SXM2 column"),
    ("T4", {"fp16": 65.0, "fp32": 8.1}, "NVIDIA T4 Tensor Core GPU datasheet"),
)

_CPU_PEAK: dict[tuple, dict] = {}  # (dtype, threads) -> the probe's result, once per process


def git_commit() -> str:
    """The checkout's short commit; ``$TRANSREC_GIT_SHA`` when set (a source tree without ``.git``)."""
    if os.environ.get("TRANSREC_GIT_SHA"):
        return os.environ["TRANSREC_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The processor's model name, e.g. 'AMD EPYC 7B13' (``platform`` where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str:
    """The NVIDIA driver version, or "" where none answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return ""


def machine_stamp() -> dict:
    """The machine, the versions and the commit: the columns every benchmark row starts with."""
    gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 0
    name = torch.cuda.get_device_name(0) if gpu else f"{cpu_model()} x{cores} (CPU)"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": name,
        "cpu": cpu_model(),
        "cores": cores,
        "gpu": torch.cuda.get_device_name(0) if gpu else "",
        "gpus": torch.cuda.device_count() if gpu else 0,
        "driver": gpu_driver() if gpu else "",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "transrec": _version("transrec"),
        "commit": git_commit(),
    }


def gpu_peak(name: str, precision: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, source) of the named GPU at ``precision`` (bf16, fp16, fp32; fp32 reads
    the TF32 rate when torch lets matmuls use it), or None where the table does not know it."""
    key = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for fragment, peaks, source in GPU_PEAKS:
        if fragment.lower() in name.lower():
            if key in peaks:
                return peaks[key], f"{fragment} {key} dense peak, {source}"
            return None
    return None


def cpu_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> dict:
    """A CPU's matmul rate measured here: the best of repeated ``n x n @ n x n`` products in
    ``dtype`` over about ``seconds``, with torch's current thread count (``2 n^3`` FLOPs each).
    Cached per process, dtype and thread count."""
    key = (dtype, torch.get_num_threads(), n)
    if key in _CPU_PEAK:
        return _CPU_PEAK[key]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # first call: allocation and dispatch out of the timing
    best, spent, reps = float("inf"), 0.0, 0
    while (spent < seconds or reps < 3) and reps < 1000:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    tflops = 2 * n ** 3 / best / 1e12
    out = {"tflops": tflops, "source": f"measured: best of {reps} {str(dtype).removeprefix('torch.')} "
                                       f"{n}x{n} matmuls on {torch.get_num_threads()} threads"}
    _CPU_PEAK[key] = out
    return out


def device_peak(device: torch.device, precision: str) -> dict:
    """``{"tflops": peak per device or None, "source": where it comes from}`` for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, precision)
        if found is None:
            return {"tflops": None, "source": f"no published peak known for {name} at {precision}"}
        return {"tflops": found[0], "source": found[1]}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return cpu_matmul_peak(dtype)
