"""Content TransRec against the ID model when a fifth of the test targets were never trained on.

Run: .venv/bin/python benchmarks/content_vs_id.py            # default size, ~20 min on 2 busy cores
     .venv/bin/python benchmarks/content_vs_id.py --quick    # 2-3 minute smoke
     .venv/bin/python benchmarks/content_vs_id.py --steps 200 \
         --models id-sasrec,transrec-minilm,transrec-minilm-hybrid    # one budget, with hybrid items
     .venv/bin/python benchmarks/content_vs_id.py --steps 1000 --content-signal 1,0.5,0.25,0 \
         --models id-sasrec,transrec-minilm,transrec-minilm-hybrid    # the curve over how much titles tell
     .venv/bin/python benchmarks/content_vs_id.py --steps 200 --tune model.user.dropout=0.1,0.5 \
         --models id-sasrec,transrec-minilm,transrec-minilm-hybrid    # every model tuned the same way

``--tune KEY=V1,V2`` (repeatable) runs every model, the ID model's included, at each combination and
keeps, per model, the run with the best validation NDCG@10; only that run is exported and tested.
``--patience N`` stops every model's run after N validations without gain. ``--set MODEL:KEY=VALUE``
(repeatable) overrides one model only, for example with the value an earlier tuned run chose for it.

``--content-signal F[,F...]`` makes the world once per value (:func:`transrec.shards.synth.synthesize`'s
``content_signal``: how much of what drives tastes the titles show) and runs every model on each.
Each row's all-user test NDCG@10 gets a 95 % bootstrap interval over the test users, and every
model's difference to ``id-sasrec`` a paired one, over all users and over the warm ones
(:mod:`transrec.engine.intervals`, from the ranks each run's final evaluation keeps), under both
protocols.

The synthetic source world is written with titles only (``image_frac=0``). Items are drawn at
random into a held-out set until their share of the users' test targets (last items) reaches
``--cold-frac``; they are removed from every sequence's training part (all but the last two items,
:func:`cold_start.hold_out` with ``keep_last=2``) and stay in the catalogue, so they can be a
validation or test target (and sit in a test history as the validation item) but no training window
ever holds them. On that one dataset, with the run's own validation picking the best checkpoint
(``run.monitor=valid/ndcg@10``, masked protocol):

- ``id-sasrec``: the ``sasrec`` preset (the ID-based SASRec recipe; a held-out item keeps the
  embedding it was initialised with, pushed down only as a negative of the catalogue softmax);
- ``transrec-minilm``: content TransRec on the bundled pretrained all-MiniLM-L6-v2 titles with its
  top 2 blocks trained (``model.text.trainable=2``; the frozen-prefix cache runs the lower 4 once per
  item), the ``tiny`` preset's training loop with the ``small-gpu`` model sizes (dim 128, in-batch
  softmax with logQ, temperature 0.07, lr 1e-3 / encoder 1e-4);
- ``transrec-minilm-hybrid``: the same with hybrid items (``model.item.id_residual=true``): an item
  seen in training adds a learned vector to its content embedding, a held-out item is its content
  alone. Its cold-user row is the check that the per-item vectors cost nothing on never-trained
  targets.

Each run's best checkpoint is exported and scored through the public :class:`transrec.Recommender`
on every test user (history = all but the last item, target = the last), under both protocols:
``masked`` (the user's history removed from the ranking, this project's default) and ``unmasked``
(RecBole's). Users are split by their target: *cold* (training count 0) and *warm*. The all-user
figures are checked against the run's own ``eval.json`` (``best.test``). Rows are appended to
benchmarks/results/content_vs_id.csv with the machine stamp (date, machine, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import append_rows, stamp  # noqa: E402
from cold_start import K, hold_out  # noqa: E402  (benchmarks/ is the script folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transrec  # noqa: E402
from transrec.engine.intervals import (  # noqa: E402
    bootstrap_interval,
    load_ranks,
    paired_interval,
    user_values,
)
from transrec.inference.histories import dataset_sequences  # noqa: E402
from transrec.shards.dataset import Dataset  # noqa: E402
from transrec.shards.format import unsanitize_key  # noqa: E402
from transrec.shards.synth import synthesize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"masked": True, "unmasked": False}  # name -> exclude_history
MODELS = ("id-sasrec", "transrec-minilm", "transrec-minilm-hybrid")

# Content TransRec: MiniLM titles, top 2 of 6 blocks trained, on the tiny preset's CPU loop.
CONTENT = ["model.text.name=minilm", "model.text.trainable=2", "model.text.max_len=32", "model.dim=128",
           "model.loss.temperature=0.07", "optim.lr=1e-3", "optim.encoder_lr=1e-4"]


def pick_cold(world: Path, frac: float, rng: np.random.Generator) -> set[str]:
    """Random items, added while they do not overshoot, until they are ``frac`` of the test targets."""
    targets: dict[str, int] = {}
    for _, items in dataset_sequences(world):
        if len(items) >= 3:
            targets[items[-1]] = targets.get(items[-1], 0) + 1
    want = round(frac * sum(targets.values()))
    ids = [unsanitize_key(k) for k in Dataset.open(world).item_ids]
    cold, have = set(), 0
    for i in rng.permutation(len(ids)):
        c = targets.get(ids[i], 0)
        if have + c <= want and c:
            cold.add(ids[i])
            have += c
        if have >= want:
            break
    return cold


def per_user(export: Path, data: Path, users: list[tuple[list[str], str, bool]]) -> dict:
    """``{protocol: {group: (hr@10, ndcg@10)}}`` for groups all / cold / warm."""
    rec = transrec.Recommender.from_export(export, device="cpu")
    rec.add_items(data=data)
    hist = [h for h, _, _ in users]
    tgt = [t for _, t, _ in users]
    out = {}
    for name, excl in PROTOCOLS.items():
        res = {}
        for group, keep in (("all", lambda c: True), ("cold", lambda c: c), ("warm", lambda c: not c)):
            sel = [j for j, (_, _, c) in enumerate(users) if keep(c)]
            m = rec.evaluate([hist[j] for j in sel], [tgt[j] for j in sel], ks=(K,), exclude_history=excl)
            res[group] = (m["hr@10"], m["ndcg@10"])
        out[name] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--cold-frac", type=float, default=0.2, help="share of test targets never trained on")
    ap.add_argument("--id-steps", type=int, default=300,
                    help="optimizer steps of the sasrec preset (batch 256)")
    ap.add_argument("--content-steps", type=int, default=100, help="optimizer steps of content TransRec")
    ap.add_argument("--steps", type=int, default=0,
                    help="one budget for every model (sets --id-steps and --content-steps)")
    ap.add_argument("--content-batch", type=int, default=64)
    ap.add_argument("--content-user", default="causal", choices=["bidirectional", "causal"],
                    help="content TransRec's user encoder (causal: trained at every position, like SASRec "
                         "and like transfer's target recipe; bidirectional: the paper's, read at the last "
                         "position)")
    ap.add_argument("--max-len", type=int, default=20,
                    help="data.max_len of both models (the world's longest sequence is 20; "
                         "sasrec's own is 50)")
    ap.add_argument("--evals", type=int, default=6, help="validations per run (best checkpoint among them)")
    ap.add_argument("--models", default="id-sasrec,transrec-minilm",
                    help="comma list of id-sasrec, transrec-minilm, transrec-minilm-hybrid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="400 users, 200 items, 60 + 20 steps (a smoke)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    ap.add_argument("--content-signal", default="1", metavar="F[,F...]",
                    help="how much of what drives tastes the titles show, 0 to 1; several: one world each "
                         "(default: 1)")
    ap.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2",
                    help="tune KEY for every model, the ID model's included (repeatable: the grid of every "
                         "combination); each model keeps the value whose run has the best validation "
                         "NDCG@10, and only that run is tested")
    ap.add_argument("--patience", type=int, default=0,
                    help="run.patience of every model: stop after this many validations without gain "
                         "(0: run the whole budget)")
    ap.add_argument("--set", action="append", default=[], metavar="MODEL:KEY=VALUE", dest="model_set",
                    help="an override for one model only (repeatable), for example a value an earlier run's "
                         "tuning chose for it: id-sasrec:model.user.dropout=0.5")
    ap.add_argument("extra", nargs="*", help="key=value overrides for content TransRec")
    args = ap.parse_args()
    if args.quick:
        args.users, args.items, args.id_steps, args.content_steps, args.evals = 400, 200, 60, 20, 2
    if args.steps:
        args.id_steps = args.content_steps = args.steps
    try:
        signals = [float(x) for x in args.content_signal.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--content-signal: numbers in [0, 1], got {args.content_signal!r}")
    if not signals or any(not 0 <= f <= 1 for f in signals):
        ap.error(f"--content-signal: numbers in [0, 1], got {args.content_signal!r}")
    try:
        args.grid = tune_grid(args.tune)
        args.model_set = model_sets(args.model_set)
    except ValueError as exc:
        ap.error(str(exc))
    t0 = time.time()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="content_vs_id_"))
    for f in signals:
        one_world(args, work / (f"signal-{f:g}" if len(signals) > 1 else "."), f)
    print(f"total {time.time() - t0:.0f} s; work folder {work}")
    return 0


def tune_grid(specs: list[str]) -> list[list[str]]:
    """Every combination of ``--tune KEY=V1,V2`` values as override lists (``[[]]`` without any)."""
    grid: list[list[str]] = [[]]
    for spec in specs:
        key, _, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not vals:
            raise ValueError(f"--tune: KEY=V1,V2,... expected, got {spec!r}")
        grid = [g + [f"{key.strip()}={v}"] for g in grid for v in vals]
    return grid


def model_sets(specs: list[str]) -> dict[str, list[str]]:
    """``--set MODEL:KEY=VALUE`` as ``{model: [KEY=VALUE, ...]}`` (models checked against MODELS)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, _, over = spec.partition(":")
        if name.strip() not in MODELS or "=" not in over or not over.partition("=")[0].strip():
            raise ValueError(f"--set: MODEL:KEY=VALUE with MODEL one of {', '.join(MODELS)}, got {spec!r}")
        out.setdefault(name.strip(), []).append(over.strip())
    return out


def intervals(rows: list[dict], runs: dict[str, tuple[Path, int]], warm: np.ndarray) -> None:
    """Each row's all-user test NDCG@10 interval, and its paired difference to id-sasrec over all
    users and over the warm ones (``warm``: per dataset user index, the target was trained on)."""
    for r in rows:
        proto = "masked" if r["protocol"] == "masked" else "ranked"
        users, ranks = load_ranks(*runs[r["model"]])
        v = user_values(ranks, "ndcg@10", proto)
        r["all_ndcg@10_lo"], r["all_ndcg@10_hi"] = (round(x, 4) for x in bootstrap_interval(v))
        if "id-sasrec" in runs and r["model"] != "id-sasrec":
            u_id, ranks_id = load_ranks(*runs["id-sasrec"])
            v_id = user_values(ranks_id, "ndcg@10", proto)
            for key, a, b in (("vs_id", slice(None), slice(None)),
                              ("vs_id_warm", warm[users], warm[u_id])):
                d, lo, hi = paired_interval(users[a], v[a], u_id[b], v_id[b])
                r[f"{key}_ndcg@10"], r[f"{key}_ndcg@10_lo"], r[f"{key}_ndcg@10_hi"] = (
                    round(d, 4), round(lo, 4), round(hi, 4))


def one_world(args, work: Path, signal: float) -> None:
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    world = synthesize(work / "world", domain="source", n_users=args.users, n_items=args.items,
                       image_frac=0.0, seed=args.seed, content_signal=signal)
    cold = pick_cold(world, args.cold_frac, np.random.default_rng(args.seed))
    data = hold_out(world, work / "train", cold, keep_last=2)
    ds = Dataset.open(data)
    count = {unsanitize_key(k): int(c) for k, c in zip(ds.item_ids, ds.train_count)}
    assert all(count[i] == 0 for i in cold), "a held-out item was trained on"
    seqs = [items for _, items in dataset_sequences(ds)]  # in dataset user index order
    warm = np.array([count[items[-1]] > 0 for items in seqs], dtype=bool)
    users = [(items[:-1], items[-1], count[items[-1]] == 0) for items in seqs if len(items) >= 3]
    n_cold = sum(c for _, _, c in users)
    print(f"world: {args.users} users, {args.items} titles; {len(cold)} items held out of training; "
          f"{len(users)} test users, {n_cold} ({n_cold / len(users):.1%}) with a never-trained target",
          flush=True)

    content = CONTENT + [
        f"model.user.kind={args.content_user}", f"data.max_len={args.max_len}",
        f"model.user.max_len={max(args.max_len, 20)}", f"data.batch_size={args.content_batch}",
        f"optim.steps={args.content_steps}", f"optim.warmup_steps={max(1, args.content_steps // 10)}",
        f"eval.every={max(1, args.content_steps // args.evals)}"] + list(args.extra)
    runs = {
        "id-sasrec": ("sasrec", [f"data.max_len={args.max_len}", f"optim.steps={args.id_steps}",
                                 f"eval.every={max(1, args.id_steps // args.evals)}"]),
        "transrec-minilm": ("tiny", content),
        "transrec-minilm-hybrid": ("tiny", content + ["model.item.id_residual=true"]),
    }
    rows, kept = [], {}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(runs)})")
    for name in names:
        preset, over = runs[name]
        over = over + args.model_set.get(name, [])
        tried = []  # (valid NDCG@10, tuned overrides, run folder, result, wall s) of each grid point
        for j, tuned in enumerate(args.grid):
            run = work / (f"run-{name}" + (f"-t{j}" if len(args.grid) > 1 else ""))
            extra = [f"run.patience={args.patience}"] if args.patience else []
            cfg = transrec.build_config(preset, overrides=over + extra + tuned + [
                f"data.path={data}", f"run.out={run}", f"run.seed={args.seed}", "run.progress=off"])
            print(f"== {name}: preset {preset} {' '.join(over + extra + tuned)}", flush=True)
            t = time.time()
            result = transrec.train(cfg)
            wall = time.time() - t
            valid = json.loads((run / "eval.json").read_text())["best"]["valid"]["ndcg@10"]
            tried.append((valid, tuned, run, result, wall))
        # selection by validation only: the test figures of the other grid points are never read
        valid, tuned, run, result, wall = max(tried, key=lambda x: x[0])
        if len(tried) > 1:
            print(f"{name}: kept {' '.join(tuned)} by validation NDCG@10 ("
                  + ", ".join(f"{' '.join(t)}: {v:.4f}" for v, t, *_ in tried) + ")", flush=True)
        exp = work / f"export-{name}"
        transrec.export(run, exp)  # the best checkpoint by validation
        best = json.loads((run / "eval.json").read_text())["best"]
        kept[name] = (run, best["step"])
        res = per_user(exp, data, users)
        for proto, groups in res.items():
            key = "" if proto == "masked" else "unmasked_"  # both runs evaluate masked
            ref = best["test"][key + "ndcg@10"]
            if abs(groups["all"][1] - ref) > 2e-3:
                print(f"warning: {name} {proto} all-user NDCG@10 {groups['all'][1]:.4f} differs from "
                      f"eval.json best.test {ref:.4f}", flush=True)
            rows.append({"content_signal": signal, "model": name, "preset": preset,
                         "tuned": " ".join(tuned), "set": " ".join(args.model_set.get(name, [])),
                         "steps": result.step,
                         "best_step": best["step"],
                         "train_s": round(result.seconds, 1), "wall_s": round(wall, 1), "protocol": proto,
                         "valid_ndcg@10": round(best["valid"][key + "ndcg@10"], 4),
                         **{f"{g}_{m}@10": round(v[j], 4) for g, v in groups.items()
                            for j, m in enumerate(("hr", "ndcg"))}})

    intervals(rows, kept, warm)
    print(f"\ncontent vs ID on the synthetic source world (titles only, content signal {signal:g}): "
          f"{args.users} users, {args.items} items; {n_cold} of {len(users)} test targets "
          f"({n_cold / len(users):.1%}) never trained on; seed {args.seed}; {stamp()['machine']}; "
          f"commit {stamp()['commit']}")
    print(f"| model | protocol | best step / steps | train s | NDCG@10 all [95% CI] | to id-sasrec [95% CI] "
          f"| HR@10 all | NDCG@10 cold ({n_cold}) | HR@10 cold | NDCG@10 warm ({len(users) - n_cold}) "
          f"| warm to id-sasrec [95% CI] | HR@10 warm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs, vs_warm = (f"{r[k + '_ndcg@10']:+.4f} [{r[k + '_ndcg@10_lo']:+.4f}, {r[k + '_ndcg@10_hi']:+.4f}]"
                       if k + "_ndcg@10" in r else "" for k in ("vs_id", "vs_id_warm"))
        chosen = " ".join(x for x in (r["set"], r["tuned"]) if x)
        label = f"{r['model']} ({chosen})" if chosen else r["model"]
        print(f"| {label} | {r['protocol']} | {r['best_step']} / {r['steps']} | {r['train_s']:.0f} "
              f"| {r['all_ndcg@10']:.4f} [{r['all_ndcg@10_lo']:.4f}, {r['all_ndcg@10_hi']:.4f}] | {vs} "
              f"| {r['all_hr@10']:.4f} | {r['cold_ndcg@10']:.4f} | {r['cold_hr@10']:.4f} "
              f"| {r['warm_ndcg@10']:.4f} | {vs_warm} | {r['warm_hr@10']:.4f} |")
    print(f"world done in {time.time() - t0:.0f} s")
    if not args.no_csv:
        run = {**stamp(), "quick": args.quick, "n_users_world": args.users,
               "n_items_world": args.items, "test_users": len(users), "cold_users": n_cold,
               "content_user": args.content_user, "content_batch": args.content_batch, "seed": args.seed,
               "patience": args.patience}
        append_rows(ROOT / "benchmarks" / "results" / "content_vs_id.csv", [{**run, **r} for r in rows])


if __name__ == "__main__":
    sys.exit(main())
