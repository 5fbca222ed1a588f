"""The training half of the Python API behind ``import transrec``: train, evaluate, export, each
returning a small printable result (see README, "Python API"). ``transrec.Recommender`` comes from
:mod:`transrec.inference.recommender`."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from transrec.config import Config, build_config, parse_override, set_key
from transrec.engine.consolidate import export_run
from transrec.engine.report import TrainResult
from transrec.engine.standalone import evaluate_run
from transrec.engine.trainer import train as _train
from transrec.models.export import read_export

__all__ = ["train", "evaluate", "export", "build_config", "TrainResult", "Metrics", "ExportInfo"]

_SHOWN = ("hr@10", "ndcg@10", "mrr")


def train(config: Config | str = "tiny", *, data: str | None = None, out: str | None = None,
          overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Train a model: ``config`` is a :class:`Config` (from :func:`build_config`) or a preset name;
    ``data``, ``out`` and ``key=value`` overrides go on top, as on the command line."""
    extra = list(overrides) + ([f"data.path={data}"] if data else []) + ([f"run.out={out}"] if out else [])
    if isinstance(config, str):
        return _train(build_config(config, None, extra))
    config = copy.deepcopy(config)
    for text in extra:
        set_key(config, *parse_override(text))
    return _train(config)


class Metrics(dict):
    """``{split: {metric: value}}`` of an evaluation, printed on one line per split."""

    def __repr__(self) -> str:
        parts = []
        for split, m in self.items():
            if isinstance(m, dict):
                shown = " ".join(f"{k}={m[k]:.4f}" for k in _SHOWN if k in m)
                parts.append(f"{split}: {shown} users={m.get('users', '?')}")
        return f"Metrics({'; '.join(parts)})"


def evaluate(run: str | Path, *, data: str | None = None, split: str = "valid,test",
             show: bool = False) -> Metrics:
    """Full-ranking evaluation of a run's latest checkpoint (``transrec eval``)."""
    res = evaluate_run(run, data=data, splits=split, show=show)
    return Metrics({k: v for k, v in res.items() if k in ("valid", "test")})


@dataclass
class ExportInfo:
    path: Path
    kind: str  # "full" | "adapter"
    step: int


def export(run: str | Path, out: str | Path, *, full: bool = False) -> ExportInfo:
    """Write an export folder from a run (``transrec export``)."""
    path = export_run(run, out, full=full)
    meta = read_export(path)
    return ExportInfo(Path(path), meta["kind"], int(meta["step"]))
