"""Cold start: how well does TransRec recommend items it never saw in training?

Run: .venv/bin/python benchmarks/cold_start.py [--users 2000 --items 800 --cold-frac 0.2 --steps 300]

On the synthetic source world (latent item attributes shown as titles or pictures) a random share of
the items is held out of training entirely: they are removed from every training sequence but kept
in the catalogue (the item shards), so the model never trains on them. The tiny preset then trains
briefly on what is left, the run is exported, and the export is used through the public
:class:`~transrec.Recommender` on each user's real history (held-out items included, encoded from
their content) to predict the user's real last item:

- *cold* users: the last item is a held-out item; ranked against all items, and against the
  held-out items only (the "which new item" question);
- *warm* users: the last item was seen in training (for reference).

Every ranking (TransRec's, the baselines') masks the user's history except the target and orders tied
items uniformly at random, reporting the exact expectation (the rule of ``transrec eval``).
Baselines: popularity (training counts; every held-out item counts 0, so they all tie) and random
(every item tied: the exact chance level).
An ID-based model cannot score a held-out item at all: its embedding never trained. Rows are
appended to benchmarks/results/cold_start.csv with the machine stamp (date, machine, versions, commit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transrec  # noqa: E402
from transrec.inference.histories import dataset_sequences  # noqa: E402
from transrec.inference.metrics import ranking_metrics, target_ranks  # noqa: E402
from transrec.shards.dataset import Dataset  # noqa: E402
from transrec.shards.format import DatasetWriter, unsanitize_key  # noqa: E402
from transrec.shards.synth import synthesize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 10


def hold_out(world: Path, out: Path, cold: set[str], keep_last: int = 0) -> Path:
    """``world`` with the ``cold`` items removed from every sequence; every item stays in the
    catalogue (same content, same order). ``keep_last=2`` removes them from each sequence's training
    part only (all but the last two items), so they can still be a user's validation or test target
    (``benchmarks/content_vs_id.py``)."""
    ds = Dataset.open(world)
    samples = {}
    for s in wds.WebDataset([str(x.path) for x in ds.item_shards], shardshuffle=False, empty_check=False):
        samples[s["__key__"]] = s
    w = DatasetWriter(out, shard_size=1000, seq_shard_size=250, name=out.name)
    for key in ds.item_ids:
        s = samples[key]
        ext = next((e for e in ("jpg", "png") if e in s), None)
        if ext:
            w.add_item(unsanitize_key(key), image=s[ext], image_ext=ext)
        else:
            w.add_item(unsanitize_key(key), title=s["txt"].decode())
    for user, items in dataset_sequences(ds):
        cut = len(items) - keep_last if keep_last and len(items) >= 3 else len(items)
        kept = [i for i in items[:cut] if i not in cold]
        if kept or cut == len(items):  # a user left with no training part would train on its targets
            w.add_sequence(user, kept + items[cut:])
    return w.close()


def baseline(histories, targets, candidates: list[str], score: dict[str, float]) -> dict:
    """HR@K and NDCG@K of ranking ``candidates`` by a fixed ``score`` (0 where absent), the history
    masked except the target, ties in a uniformly random order (exact expectations, the rule of
    ``transrec eval``): an empty ``score`` is the random ranking's expectation."""
    column = {c: j for j, c in enumerate(candidates)}
    base = torch.tensor([score.get(c, 0.0) for c in candidates], dtype=torch.float64)
    scores = base.repeat(len(targets), 1)
    for i, (h, t) in enumerate(zip(histories, targets)):
        cols = [column[x] for x in set(h) if x in column and x != t]
        scores[i, cols] = float("-inf")
    ranks = target_ranks(scores, torch.tensor([column[t] for t in targets]))
    return ranking_metrics(ranks, ks=(K,))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=800)
    ap.add_argument("--cold-frac", type=float, default=0.2, help="share of items held out of training")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of the tiny preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    args = ap.parse_args()

    t0 = time.time()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cold_start_"))
    world = synthesize(work / "world", domain="source", n_users=args.users, n_items=args.items,
                       seed=args.seed)
    ds = Dataset.open(world)
    rng = np.random.default_rng(args.seed)
    all_ids = [unsanitize_key(k) for k in ds.item_ids]
    cold_ids = sorted(rng.choice(all_ids, size=max(1, round(args.cold_frac * len(all_ids))), replace=False))
    cold = set(cold_ids)
    train_data = hold_out(world, work / "train", cold)

    cfg = transrec.build_config("tiny", overrides=[f"data.path={train_data}", f"run.out={work / 'run'}",
                                                   f"optim.steps={args.steps}", f"run.seed={args.seed}"])
    t_train = time.time()
    result = transrec.train(cfg)
    t_train = time.time() - t_train
    transrec.export(work / "run", work / "export")

    groups = {"cold": ([], []), "warm": ([], [])}
    for _, items in dataset_sequences(world):
        if len(items) >= 3:
            g = groups["cold" if items[-1] in cold else "warm"]
            g[0].append(items[:-1])
            g[1].append(items[-1])
    rec = transrec.Recommender.from_export(work / "export", device="cpu")
    rec.add_items(data=train_data)  # every item, held-out ones included (their content only)
    train_ds = Dataset.open(train_data)
    assert all(int(train_ds.train_count[train_ds.item_index[k]]) == 0 for k in ds.item_ids
               if unsanitize_key(k) in cold), "a held-out item was trained on"
    pop = {unsanitize_key(k): float(c) for k, c in zip(train_ds.item_ids, train_ds.train_count)}
    rows = []
    for group, cands, label in (("cold", None, "all items"), ("cold", cold_ids, "held-out items"),
                                ("warm", None, "all items")):
        hist, tgt = groups[group]
        cand_list = cands if cands is not None else rec.item_ids
        tr = rec.evaluate(hist, tgt, ks=(K,), candidates=cands)
        po = baseline(hist, tgt, cand_list, pop)
        ra = baseline(hist, tgt, cand_list, {})
        rows.append({"users": f"{group} target", "n_users": len(tgt), "candidates": label,
                     "n_candidates": len(cand_list), "transrec_hr@10": tr["hr@10"],
                     "transrec_ndcg@10": tr["ndcg@10"], "popularity_hr@10": po["hr@10"],
                     "popularity_ndcg@10": po["ndcg@10"], "random_hr@10": ra["hr@10"]})

    print(f"cold start on the synthetic source world: {args.users} users, {args.items} items, "
          f"{len(cold)} ({args.cold_frac:.0%}) held out of training; tiny preset, {args.steps} steps "
          f"({t_train:.0f} s); seed {args.seed}; {stamp()['machine']}; commit {stamp()['commit']}")
    print("| users | candidates | TransRec HR@10 | TransRec NDCG@10 | popularity HR@10 | popularity NDCG@10 "
          "| random HR@10 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['users']} ({r['n_users']}) | {r['candidates']} ({r['n_candidates']}) "
              f"| {r['transrec_hr@10']:.4f} | {r['transrec_ndcg@10']:.4f} | {r['popularity_hr@10']:.4f} "
              f"| {r['popularity_ndcg@10']:.4f} | {r['random_hr@10']:.4f} |")
    print(f"final training loss {result.losses[-1]:.3f}; total {time.time() - t0:.0f} s; work folder {work}")
    if not args.no_csv:
        run = {**stamp(), "n_users_world": args.users, "n_items_world": args.items,
               "cold_frac": args.cold_frac, "steps": args.steps, "seed": args.seed}
        append_rows(ROOT / "benchmarks" / "results" / "cold_start.csv",
                    [{**run, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
                     for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
