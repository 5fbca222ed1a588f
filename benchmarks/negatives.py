"""Candidates without gradient in the softmax: why the negative memory takes two terms.

Run: .venv/bin/python benchmarks/negatives.py [--users 2000 --items 800 --steps 150 --memory 512]

The ID model of the `tiny` preset trains in one plain loop (AdamW, one process) on a synthetic world,
from the same initialisation, with these candidate sets, then is evaluated on the validation split
(full ranking, history masked):

- ``inbatch``: the batch's unique items (logQ), the default;
- ``one-softmax``: the batch's items (with gradient) and the memory's older item embeddings
  (detached) in one softmax;
- ``fresh-detached``: the same, with the memory's items re-read from the current item table but
  still detached (staleness ruled out: only the missing gradient differs from ``inbatch``+more keys);
- ``fresh-grad``: the memory's items re-read from the current table with gradient (a subset of a
  full softmax; what a content model cannot afford);
- ``memory``: the project's ``negatives=memory`` criterion (two terms: the user side against every
  candidate with keys detached, the batch's keys against the in-batch softmax with users detached).

Rows are appended to benchmarks/results/negatives.csv with the machine stamp (date, machine, versions,
commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transrec.config import build_config
from transrec.engine.data import make_loader, open_data
from transrec.engine.ranking import split_metrics
from transrec.models import build_model
from transrec.models.losses import Criterion
from transrec.shards.synth import synthesize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, append_rows, stamp  # noqa: E402

VARIANTS = ("inbatch", "one-softmax", "fresh-detached", "fresh-grad", "memory")


def run(variant: str, data: str, steps: int, memory: int, seed: int) -> dict:
    cfg = build_config("tiny", overrides=[f"data.path={data}", "model.kind=id", "model.loss.impl=torch"])
    ds, content = open_data(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg.model, n_items=ds.n_items).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    lc = cfg.model.loss
    mem_crit = Criterion(dataclasses.replace(lc, negatives="memory", memory_size=memory), model.dim).train()
    plain = Criterion(dataclasses.replace(lc, negatives="inbatch"), model.dim)
    table_w = model.item_emb.weight
    tau = lc.temperature
    t0 = time.time()
    step = 0
    loader = make_loader(cfg, ds, content, "train", batch_size=cfg.data.batch_size, rank=0, world=1,
                         seed=seed)
    while step < steps:
        loader.set_epoch(step)
        for b in loader:
            table = model.encode_items(b.unique_items)
            out = model.user(table[b.inverse[:, :-1]], b.mask[:, :-1])
            q = out.reshape(-1, out.shape[-1]) if model.user.causal else out[:, -1]
            t, v = model.targets(b)
            lq = b.unique_log_q
            if variant == "memory":
                loss = mem_crit(q, table, t, v, lq, b.unique_items)[0]
            elif variant == "inbatch":
                loss = plain(q, table, t, v, lq, b.unique_items)[0]
            else:
                mem = mem_crit.memory
                keep = (mem.items >= 0) & ~torch.isin(mem.items, b.unique_items)
                extra = {"one-softmax": mem.keys[keep], "fresh-detached": table_w[mem.items[keep]].detach(),
                         "fresh-grad": table_w[mem.items[keep]]}[variant]
                keys = F.normalize(torch.cat([table, extra]), dim=-1)
                logits = F.normalize(q, dim=-1) @ keys.T / tau - torch.cat([lq, mem.log_q[keep]])
                loss = F.cross_entropy(logits[v], t[v])
                mem.push(F.normalize(table.detach(), dim=-1), b.unique_items, lq)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    seconds = time.time() - t0
    valid = make_loader(cfg, ds, content, "valid", batch_size=128, rank=0, world=1)
    m = split_metrics(model, valid, content, show=False, item_chunk=512)
    return {"variant": variant, "steps": steps, "memory": memory, "seconds": round(seconds, 1),
            "valid_ndcg@10": round(m["ndcg@10"], 4), "valid_hr@10": round(m["hr@10"], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=800)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = str(synthesize(Path(tmp) / "world", domain="source", n_users=args.users, n_items=args.items,
                              seed=args.seed))
        rows = []
        for v in args.variants.split(","):
            if v not in VARIANTS:
                ap.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
            row = run(v, data, args.steps, args.memory, args.seed)
            print(f"{row['variant']:<15} valid NDCG@10 {row['valid_ndcg@10']:.4f}  "
                  f"HR@10 {row['valid_hr@10']:.4f}  ({row['seconds']} s)", flush=True)
            rows.append(row)
    if not args.no_csv:
        append_rows(ROOT / "benchmarks" / "results" / "negatives.csv",
                    [{**stamp(), **r, "users": args.users, "items": args.items, "seed": args.seed}
                     for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
