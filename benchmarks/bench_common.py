"""What every benchmark row records besides its figures, and how rows reach a CSV.

Every row starts with the product's machine stamp (:func:`transrec.engine.hardware.machine_stamp`,
the columns ``transrec bench`` writes too): date, machine, CPU model and cores, GPU name, count and
driver, the versions of Python, torch, DeepSpeed, transformers, Triton and transrec, and the commit
(``commit``; ``$TRANSREC_GIT_SHA`` where the tree has no ``.git``, as benchmarks/gpu_proof.sh sets
from .whl/SOURCE).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_STAMP: dict = {}


def stamp() -> dict:
    """The machine stamp, taken once per process (a copy: callers may add to it). Its keys, in
    order, are the first columns of every results file."""
    if not _STAMP:
        from transrec.engine.hardware import machine_stamp  # lazy: torch, which some scripts import late

        _STAMP.update(machine_stamp())
    return dict(_STAMP)


def stamped(fields: list[str]) -> list[str]:
    """The stamp's columns, then ``fields`` (less any stamp column among them)."""
    head = list(stamp())
    return [*head, *(f for f in fields if f not in head)]


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
