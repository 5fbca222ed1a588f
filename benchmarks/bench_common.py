"""What every benchmark row records besides its figures: the commit and the processor."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """The checkout's short commit; $TRANSREC_GIT_SHA when set, for a source tree without .git
    (benchmarks/gpu_proof.sh sets it from .whl/SOURCE there)."""
    if os.environ.get("TRANSREC_GIT_SHA"):
        return os.environ["TRANSREC_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The processor's model name and core count, e.g. 'Intel(R) Xeon(R) Processor @ 2.50GHz x2'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def append_rows(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header when the file is new. Where the
    file's header lacks some of ``fields`` (a script gained columns), the file is rewritten once with
    the new columns added at the end (empty in the older rows), so no row is written misaligned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields or rows[0])
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            have = list(reader.fieldnames or [])
            missing = [k for k in fields if k not in have]
            old = list(reader) if missing else []
        if missing:
            have += missing
            tmp = path.with_suffix(path.suffix + ".tmp")
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=have)
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, path)
        fields, new = have, False
    else:
        new = True
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
