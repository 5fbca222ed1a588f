"""Why does the ``sasrec`` preset trail RecBole's SASRec? One factor at a time, in one plain torch loop.

Run: .venv/bin/python benchmarks/peers/sasrec_ablation.py --data .cache/recbole_peer/from_recbole \\
         --variants project,project+inln,postnorm --epochs 20

Every variant trains an ID SASRec (64 dimensions, 2 layers x 2 heads, dropout 0.5, length 50, tied
item table, cross-entropy over the whole catalogue, Adam at a constant lr) on the training part of a
dataset folder, and reports validation NDCG@10 under RecBole's protocol (full ranking, history kept)
every ``--eval-every`` epochs, with the optimizer steps and the CPU seconds of training so far
(process time: on a shared machine it moves far less than wall time; evaluation not counted).
What a variant changes:

- the block: ``project`` is :class:`transrec.models.user.UserEncoder` itself (pre-norm, input =
  dropout(item + position), dropout inside the MLP as well as after it, torch's default Linear
  init); ``postnorm`` is the textbook SASRec block, written in this file (input = dropout(LayerNorm(item +
  position)), post-norm residuals, one dropout per sub-layer output plus attention dropout, Linear
  and embedding init N(0, 0.02)); ``+inln`` / ``+init`` / ``-mlpdrop`` change one of those
  properties of the project's block (an input LayerNorm; N(0, 0.02) Linear init; no dropout inside
  the MLP);
- the training signal (``--signal``): ``windows`` (the engine's: one right-aligned window of the last
  ``max_len + 1`` training items per user, every position a target, ``--batch`` windows a step) or
  ``prefixes`` (RecBole's: every (prefix, next item) pair a sample, the last position trained,
  ``--batch`` samples a step).

Rows go to stdout as a markdown table and, with ``--csv``, to benchmarks/results/recbole_peer_ablation.csv.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench_common import append_rows, stamp  # noqa: E402

from transrec.config.model import UserEncoderConfig  # noqa: E402
from transrec.inference.histories import dataset_sequences  # noqa: E402
from transrec.inference.metrics import ranking_metrics, target_ranks  # noqa: E402
from transrec.models.user import UserEncoder  # noqa: E402

ROOT = HERE.parents[1]


class PostNormBlock(nn.Module):
    """SASRec's block as published: attention and a GELU MLP, each followed by dropout, a residual
    and LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, allowed):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.p if self.training else 0.0)
        x = self.ln1(x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d))))
        return self.ln2(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class PostNormEncoder(nn.Module):
    """Same interface as the project's UserEncoder (right-aligned positions, [B, L, d] outputs)."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.pos = nn.Embedding(max_len, dim)
        self.ln = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PostNormBlock(dim, heads, dropout) for _ in range(layers))

    def forward(self, item_emb, mask):
        b, n, _ = item_emb.shape
        x = self.drop(self.ln(item_emb + self.pos.weight[self.max_len - n:][None]))
        allowed = mask[:, None, :].expand(b, n, n) & torch.ones(n, n, dtype=torch.bool).tril()
        allowed = (allowed | torch.eye(n, dtype=torch.bool))[:, None]
        for blk in self.blocks:
            x = blk(x, allowed)
        return x


class InputNorm(nn.Module):
    """The project's encoder with a LayerNorm on its input (item + position), as SASRec has."""

    def __init__(self, enc: UserEncoder, dim: int):
        super().__init__()
        self.enc, self.ln = enc, nn.LayerNorm(dim)

    def forward(self, item_emb, mask):
        n = item_emb.shape[1]
        pos = self.enc.pos.weight[self.enc.max_len - n:][None]
        # the encoder adds its positions itself: normalise (item + pos), then hand it over minus pos
        return self.enc(self.ln(item_emb + pos) - pos, mask)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


class Model(nn.Module):
    def __init__(self, variant: str, n_items: int, dim=64, layers=2, heads=2, dropout=0.5, max_len=50):
        super().__init__()
        base, *mods = variant.replace("-", "+-").split("+")
        mods = [m for m in mods if m]
        self.items = nn.Embedding(n_items, dim)
        nn.init.normal_(self.items.weight, std=0.02)
        if base == "postnorm":
            self.user = PostNormEncoder(dim, layers, heads, dropout, max_len)
            init_normal(self.user)
        elif base == "project":
            enc = UserEncoder(UserEncoderConfig(kind="causal", layers=layers, heads=heads, dropout=dropout,
                                                max_len=max_len), dim)
            if "-mlpdrop" in mods:
                for blk in enc.blocks:
                    blk.mlp[2] = nn.Identity()
            if "init" in mods:
                init_normal(enc)
            self.user = InputNorm(enc, dim) if "inln" in mods else enc
        else:
            raise SystemExit(f"unknown variant {variant!r}")

    def forward(self, seq, mask):
        """User states at every position: [B, L, d]."""
        return self.user(self.items(seq.clamp(min=0)) * mask[..., None], mask)


def right_aligned(rows: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = np.full((len(rows), length), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-length:]
        out[i, length - len(r):] = r
    t = torch.from_numpy(out)
    return t, t >= 0


@torch.no_grad()
def evaluate(model: Model, hist: list[np.ndarray], target: np.ndarray, max_len: int, k: int = 10) -> float:
    """Validation NDCG@k by the evaluation's rule: full ranking, history kept, ties among equal scores
    in a uniformly random order (exact expectation)."""
    model.eval()
    ranks = []
    for s in range(0, len(hist), 512):
        seq, mask = right_aligned(hist[s:s + 512], max_len)
        q = model(seq, mask)[:, -1]
        ranks.append(target_ranks(q @ model.items.weight.T, torch.from_numpy(target[s:s + 512])))
    model.train()
    return ranking_metrics(torch.cat(ranks), ks=(k,))[f"ndcg@{k}"]


def run_variant(variant, signal, train, valid, n_items, args) -> list[dict]:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = Model(variant, n_items, max_len=args.max_len)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    if signal == "windows":
        samples = [t[-(args.max_len + 1):] for t in train if len(t) >= 2]
    else:
        samples = [t[max(0, j - args.max_len):j + 1] for t in train for j in range(1, len(t))]
    out, steps, t0, best = [], 0, time.process_time(), 0.0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(samples))
        for s in range(0, len(order), args.batch):
            batch = [samples[i] for i in order[s:s + args.batch]]
            if signal == "windows":
                seq, mask = right_aligned(batch, args.max_len + 1)
                q = model(seq[:, :-1], mask[:, :-1])
                valid_pos = mask[:, :-1] & mask[:, 1:]
                logits = q[valid_pos] @ model.items.weight.T
                loss = F.cross_entropy(logits, seq[:, 1:][valid_pos])
            else:
                seq, mask = right_aligned([b[:-1] for b in batch], args.max_len)
                q = model(seq, mask)[:, -1]
                loss = F.cross_entropy(q @ model.items.weight.T, torch.tensor([b[-1] for b in batch]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            train_s = time.process_time() - t0
            nd = evaluate(model, *valid, args.max_len)
            best = max(best, nd)
            row = {"variant": variant, "signal": signal, "batch": args.batch, "lr": args.lr, "epoch": epoch,
                   "steps": steps, "train_s": round(train_s, 1), "valid_ndcg@10": round(nd, 4),
                   "best_valid_ndcg@10": round(best, 4)}
            print(f"{variant:>22} {signal:>8} epoch {epoch:3d} steps {steps:5d} {train_s:7.1f} s  "
                  f"valid ndcg@10 {nd:.4f}", file=sys.stderr, flush=True)
            out.append(row)
            t0 = time.process_time() - train_s  # evaluation time does not count
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a dataset folder (e.g. the peer benchmark's from_recbole)")
    p.add_argument("--variants", default="project,postnorm",
                   help="comma-separated: project, project+inln, project+init, project-mlpdrop, postnorm ...")
    p.add_argument("--signal", default="windows", help="windows, prefixes or both (windows,prefixes)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", action="store_true", help="append the rows to benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seqs = [s for _, s in dataset_sequences(args.data)]
    vocab = {it: i for i, it in enumerate(sorted({i for s in seqs for i in s}))}
    seqs = [np.array([vocab[i] for i in s], dtype=np.int64) for s in seqs]
    train = [s[:-2] if len(s) >= 3 else s for s in seqs]
    ev = [s for s in seqs if len(s) >= 3]
    valid = ([s[:-2] for s in ev], np.array([s[-2] for s in ev]))
    rows = []
    for signal in args.signal.split(","):
        for variant in args.variants.split(","):
            rows += run_variant(variant, signal, train, valid, len(vocab), args)
    print("| variant | signal | batch | lr | epoch | steps | train s | valid NDCG@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['signal']} | {r['batch']} | {r['lr']:g} | {r['epoch']} | "
              f"{r['steps']} | {r['train_s']} | {r['valid_ndcg@10']:.4f} |")
    if args.csv:
        extra = {**stamp(), "data": str(args.data), "n_users": len(seqs), "n_items": len(vocab),
                 "seed": args.seed}
        append_rows(ROOT / "benchmarks" / "results" / "recbole_peer_ablation.csv",
                    [dict(extra, **r) for r in rows])
    assert math.isfinite(rows[-1]["valid_ndcg@10"])


if __name__ == "__main__":
    main()
