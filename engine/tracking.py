"""Run observability: one JSON line per logged step or evaluation, TensorBoard events, tqdm bars.

Only rank 0 writes. ``RUN/metrics.jsonl`` holds records such as::

    {"kind": "train", "step": 20, "epoch": 0, "loss": 3.91, "lr": 0.003, "lr_encoder": 0.001,
     "seq_per_s": 410.2, "items_per_s": 5100.0, "time": 12.4}
    {"kind": "eval", "step": 100, "split": "valid", "ndcg@10": 0.071, "hr@10": 0.14, ...}

``transrec plot RUN`` reads it back (:mod:`transrec.engine.plot`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class Tracker:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.start = time.time()
        self._tb = None
        self._file = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.dir / METRICS_FILE, "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

                    self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
                except ImportError:  # tensorboard is a dependency; keep running without it if absent
                    self._tb = None

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), **values, "time": round(time.time() - self.start, 3)}
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            prefix = kind if kind != "eval" else f"eval/{values.get('split', '')}"
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
    return out


def progress(iterable=None, *, enabled: bool = True, **kw):
    """tqdm on stderr when enabled (rank 0 and run.progress), a plain iterator otherwise."""
    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)
