"""Against RecBole: its SASRec and this project's ``sasrec`` preset on the same data, split and protocol.

Run: .venv/bin/python benchmarks/peers/recbole.py [--users 2000 --items 1000] [--set K=V ...] [--dry-run]

1. A synthetic world (``transrec shards synth``, titles only: an ID model reads no content) is
   exported to RecBole atomic files (``NAME.inter``: ``user_id:token item_id:token timestamp:float``,
   one row per interaction, the timestamp a counter that follows each user's order; ``NAME.item``:
   ``item_id:token title:token_seq``), and converted back with ``transrec shards convert --format
   recbole``. The round trip must give every user the same sequence, and RecBole's own split must
   give every user the same validation and test targets as the project's leave-one-out rule; the
   run stops otherwise. Both sides train on those files.
2. RecBole's SASRec runs in its own virtual environment (made on first use under
   ``.cache/recbole-venv``: torch 2.13.0 first, then ``recbole==1.2.1`` with ``numpy<2``,
   ``pandas<2.3``, ``scipy<1.14``), driven by
   ``recbole_worker.py`` in a subprocess (RecBole's ``quick_start`` imports ray, so the worker calls
   Config / create_dataset / data_preparation / the model / Trainer itself). Its config matches the
   preset: 2 layers, 2 heads, hidden 64 (inner 256 = the preset's 4 x dim), dropout 0.5 (hidden and
   attention), length 50, batch 256, Adam at lr 1e-3, cross-entropy over the catalogue, and its
   protocol: leave-one-out by time (``LS: valid_and_test``, ``TO``), full ranking, NDCG and Hit at 10,
   history items not removed, early stopping on validation NDCG@10.
3. The project trains ``transrec train --preset sasrec eval.exclude_history=false`` (RecBole's
   protocol) with early stopping on validation NDCG@10 and reports the test metrics at the best step.

Both sides are scored by one rule: the project's (ties among equal scores in a uniformly random order,
exact expectations). RecBole's own evaluator takes ``torch.topk``'s order among tied items, which can
put a tied target first; the worker therefore also returns each test target's rank interval from
RecBole's own scores, and RecBole's row reports the project's rule on them, with RecBole's own figure
and the number of test targets that had a tie beside it.

Both run one after the other with the same thread count. The table gives test NDCG@10 and HR@10,
the best step, the training time (optimizer steps and validation, without start-up) and the whole
process's wall time; rows are appended to benchmarks/results/recbole_peer.csv with the machine
stamp (date, machine, versions, commit). ``--dry-run`` does everything at toy sizes in a few
minutes (plus the one-off environment set-up); ``--no-recbole`` runs the project side alone (to
try overrides, ``--set``).

Not part of the test suite: it needs RecBole, which the project does not depend on. This file
imports neither RecBole nor torch at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/, for bench_common.py
from bench_common import append_rows, stamp  # noqa: E402

RECBOLE_PINS = ["recbole==1.2.1", "numpy<2", "pandas<2.3", "scipy<1.14",
                # torch 2.13.0 needs setuptools >= 77; ray (a RecBole dependency that is never imported
                # by this benchmark) still finds pkg_resources in setuptools < 81
                "setuptools>=77,<81"]
TORCH_PIN = "torch==2.13.0"
DATASET = "synth"
CSV = ROOT / "benchmarks" / "results" / "recbole_peer.csv"


def log(msg: str) -> None:
    print(f"[recbole-peer] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None,
        quiet: bool = False) -> tuple[float, float]:
    """Run a command, stream its stderr, stop on failure; return its (wall, CPU) seconds. CPU time
    (user + system of the process and its children) moves less than wall time on a shared machine."""
    log("$ " + " ".join(str(c) for c in cmd))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL if quiet else None)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"recbole peer: command failed with exit code {proc.returncode}: {cmd[0]} ...")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


# ----------------------------------------------------------------------------- RecBole's environment

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_recbole_venv(venv: Path) -> Path:
    """The RecBole virtual environment at ``venv`` (made when missing); returns its python."""
    py = venv_python(venv)
    probe = [str(py), "-P", "-c", "import recbole, torch; print(recbole.__version__, torch.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    log(f"making RecBole's environment in {venv} (once; about a minute with pip's cache warm)")
    if not py.exists():
        run([sys.executable, "-m", "venv", venv])  # a venv of the base interpreter, even from a venv
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run(pip + [TORCH_PIN])  # first and pinned, so that pip never pulls another torch build
    cons = venv / "torch-pin.txt"
    cons.write_text(TORCH_PIN + "\n")
    run(pip + ["-c", cons] + RECBOLE_PINS)
    out = subprocess.run(probe, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"recbole peer: RecBole does not import in {venv}:\n{out.stderr[-2000:]}")
    log(f"RecBole environment ready: recbole, torch = {out.stdout.strip()}")
    return py


# ----------------------------------------------------------------------------- data

def project_sequences(data: Path) -> dict[str, list[str]]:
    from transrec.inference.histories import dataset_sequences  # lazy: fast --help

    return dict(dataset_sequences(data))


def project_titles(data: Path) -> dict[str, tuple[str, bytes | None, str]]:
    """item id -> (title, image bytes or None, image extension) in the dataset's index order."""
    import webdataset as wds  # lazy: fast --help

    from transrec.shards.dataset import Dataset  # lazy: fast --help
    from transrec.shards.format import unsanitize_key  # lazy: fast --help

    ds = Dataset.open(data)
    samples = {}
    for s in wds.WebDataset([str(x.path) for x in ds.item_shards], shardshuffle=False, empty_check=False):
        samples[s["__key__"]] = s
    out = {}
    for key in ds.item_ids:
        s = samples[key]
        ext = next((e for e in ("jpg", "png") if e in s), "")
        out[unsanitize_key(key)] = (s["txt"].decode() if "txt" in s else "", s[ext] if ext else None, ext)
    return out


def _token(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def export_atomic(data: Path, out: Path, name: str = DATASET) -> dict:
    """``data`` as RecBole atomic files ``out/NAME.inter`` and ``out/NAME.item`` (+ ``out/images/`` for
    image items). The timestamp is a global counter in each user's time order, so RecBole's ``TO``
    ordering and the converter's timestamp sort both give back the stored order exactly."""
    out.mkdir(parents=True, exist_ok=True)
    seqs = project_sequences(data)
    items = project_titles(data)
    t = 0
    with open(out / f"{name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, seq in seqs.items():
            for item in seq:
                t += 1
                f.write(f"{user}\t{item}\t{t}\n")
    img_dir = out / "images"
    with open(out / f"{name}.item", "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for item, (title, image, ext) in items.items():
            f.write(f"{item}\t{_token(title)}\n")
            if image is not None:
                img_dir.mkdir(exist_ok=True)
                (img_dir / f"{item}.{ext}").write_bytes(image)
    return {"users": len(seqs), "items": len(items), "interactions": t}


def check_round_trip(a: Path, b: Path) -> dict[str, list[str]]:
    """Every user of ``a`` has the same item sequence in ``b`` (and no user is added); returns them."""
    sa, sb = project_sequences(a), project_sequences(b)
    if sa != sb:
        diff = [u for u in set(sa) | set(sb) if sa.get(u) != sb.get(u)]
        raise SystemExit(f"recbole peer: the RecBole round trip changed {len(diff)} users' sequences "
                         f"(e.g. {diff[:3]})")
    return sa


def check_split(seqs: dict[str, list[str]], rb: dict) -> None:
    """RecBole's validation/test targets per user are the project's leave-one-out targets."""
    want_v = {u: s[-2] for u, s in seqs.items() if len(s) >= 3}
    want_t = {u: s[-1] for u, s in seqs.items() if len(s) >= 3}
    if rb["valid_targets"] != want_v or rb["test_targets"] != want_t:
        bad = [u for u in want_t if rb["test_targets"].get(u) != want_t[u]
               or rb["valid_targets"].get(u) != want_v[u]]
        raise SystemExit(f"recbole peer: RecBole's split differs from the project's for {len(bad)} users "
                         f"(of {len(want_t)}; RecBole has {len(rb['test_targets'])} test users)")
    n_train = sum(max(len(s) - 3, 0) for s in seqs.values() if len(s) >= 3)
    if rb["n_train_samples"] != n_train:
        raise SystemExit(f"recbole peer: RecBole made {rb['n_train_samples']} training samples, "
                         f"expected {n_train} (one per training item after the first)")


# ----------------------------------------------------------------------------- the two sides

def recbole_config(args) -> dict:
    """RecBole's SASRec set to the ``sasrec`` preset's recipe, under RecBole's protocol."""
    return {
        "seed": args.seed, "reproducibility": True, "use_gpu": False, "show_progress": False,
        "state": "WARNING", "log_wandb": False, "checkpoint_dir": "saved",
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        # the model: the preset's sizes (model.user.layers/heads, model.dim, 4 x dim inside the MLP)
        "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
        "loss_type": "CE", "train_neg_sample_args": None,
        # training: batch, Adam at a constant lr, no weight decay, no clipping
        "train_batch_size": 256, "learner": "adam", "learning_rate": 1e-3, "weight_decay": 0.0,
        "epochs": args.rb_epochs, "eval_step": 1, "stopping_step": args.rb_patience,
        # the protocol
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10", "eval_batch_size": 4096,
    }


def recbole_key(args) -> dict:
    """What a RecBole result depends on: the world, the config, the threads."""
    return {"users": args.users, "items": args.items, "min_len": args.min_len, "max_seq": args.max_seq,
            "seed": args.seed, "threads": args.threads, "config": recbole_config(args)}


def run_recbole(args, py: Path | None, atomic_root: Path, work: Path, env: dict) -> dict:
    """RecBole's result: a fresh run, or with ``--reuse-recbole`` the one in WORK made with the same
    world, config and threads (RecBole is the slow, fixed side while the project's is tuned)."""
    out = work / "recbole_result.json"
    if args.reuse_recbole and out.is_file():
        res = json.loads(out.read_text())
        if res.get("key") == json.loads(json.dumps(recbole_key(args))):
            log(f"reusing RecBole's result of {res.get('date', '?')} from {out}")
            res["reused"] = True
            return res
        log(f"{out} was made with another world or config: running RecBole again")
    if py is None:
        py = ensure_recbole_venv(Path(args.recbole_venv))
    spec = {"data_path": str(atomic_root), "dataset": DATASET, "config": recbole_config(args),
            "threads": args.threads, "dump_targets": True}
    (work / "recbole_spec.json").write_text(json.dumps(spec, indent=1))
    wall, cpu = run([py, "-P", HERE / "recbole_worker.py", work / "recbole_spec.json", out], env=env,
                    cwd=work)
    res = json.loads(out.read_text())
    res.update(wall_seconds=round(wall, 2), cpu_seconds=round(cpu, 2), key=recbole_key(args),
               date=time.strftime("%Y-%m-%d %H:%M"))
    out.write_text(json.dumps(res))
    return res


def transrec_overrides(args, n_train_users: int) -> list[str]:
    sets = [o.split("=", 1)[1] for o in args.set if o.startswith("data.batch_size=")]
    batch = int(sets[-1]) if sets else 256  # the preset's
    steps_per_epoch = -(-n_train_users // batch)
    every = args.tr_every or steps_per_epoch
    return [f"data.max_len={args.max_len}", f"model.user.max_len={args.max_len}",
            "eval.exclude_history=false", "eval.ks=[10]", "run.monitor=valid/ndcg@10",
            *([f"optim.steps={args.tr_steps}"] if args.tr_steps else []), f"eval.every={every}",
            f"run.patience={args.tr_patience}",
            f"run.seed={args.seed}", "run.progress=off", "run.tensorboard=false", *args.set]


def run_transrec(args, data: Path, work: Path, env: dict, n_train_users: int) -> dict:
    out = work / ("transrec_run-" + "".join(c if c.isalnum() else "_" for c in args.label) if args.label
                  else "transrec_run")
    if out.exists():
        shutil.rmtree(out)
    cli = ROOT / ".venv" / "bin" / "transrec"
    cmd = [cli if cli.exists() else shutil.which("transrec") or "transrec", "train", "--data", data,
           "--out", out, "--preset", "sasrec", *transrec_overrides(args, n_train_users)]
    wall, cpu = run(cmd, env=env, quiet=True)
    ev = json.loads((out / "eval.json").read_text())
    best = ev.get("best") or {"step": ev.get("step"), "valid": ev["valid"], "test": ev["test"]}
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "best_step": best["step"],
            "valid": best["valid"], "test": best["test"], "protocol": ev.get("protocol"), "records": recs,
            "last_step": ev.get("step"), "overrides": transrec_overrides(args, n_train_users)}


TIE_RULE = "ties in a uniformly random order (exact expectation)"


def recbole_under_project_rule(rb: dict) -> dict:
    """RecBole's test metrics recomputed from its rank intervals by the project's rule."""
    if "test_intervals" not in rb:
        raise SystemExit("recbole peer: RecBole's result has no rank intervals (made by an older worker); "
                         "run without --reuse-recbole")
    import torch  # lazy: fast --help

    from transrec.inference.metrics import ranking_metrics  # lazy: fast --help

    iv = torch.tensor(rb["test_intervals"], dtype=torch.long)
    out = ranking_metrics(iv, ks=(10,))
    out["tied_targets"] = int((iv[:, 1] > iv[:, 0]).sum())
    return out


def train_seconds(records: list[dict]) -> float | None:
    """Seconds from the first to the last training record of metrics.jsonl (steps and validation)."""
    ts = [r["time"] for r in records if isinstance(r.get("time"), int | float)]
    return round(max(ts) - min(ts), 2) if len(ts) >= 2 else None


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: .venv/bin/python benchmarks/peers/recbole.py --dry-run")
    p.add_argument("--work", default=str(ROOT / ".cache" / "recbole_peer"), help="scratch folder")
    p.add_argument("--recbole-venv", default=str(ROOT / ".cache" / "recbole-venv"),
                   help="RecBole's virtual environment (made when missing)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-seq", type=int, default=20, help="longest synthetic sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=50, help="model history length, both sides")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, both sides (on 2 shared cores, 2 threads a side wait on each other)")
    p.add_argument("--rb-epochs", type=int, default=200, help="RecBole: most epochs")
    p.add_argument("--rb-patience", type=int, default=10, help="RecBole: stopping_step (evaluations)")
    p.add_argument("--tr-steps", type=int, default=0,
                   help="transrec: most optimizer steps (0 = the preset's optim.steps)")
    p.add_argument("--tr-every", type=int, default=0,
                   help="transrec: steps between validations (0 = one pass over the training users)")
    p.add_argument("--tr-patience", type=int, default=10, help="transrec: run.patience (evaluations)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra transrec override (repeatable), e.g. --set optim.lr=2e-3")
    p.add_argument("--no-recbole", action="store_true", help="run the project side only")
    p.add_argument("--reuse-recbole", action="store_true",
                   help="reuse RecBole's result in --work if made with the same world, config and threads")
    p.add_argument("--label", default="", help="a note for the CSV rows")
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    p.add_argument("--dry-run", action="store_true", help="toy sizes, a few minutes, no CSV rows")
    args = p.parse_args(argv)
    if args.dry_run:
        args.users, args.items, args.max_seq = 300, 200, 15
        args.rb_epochs, args.rb_patience, args.tr_steps, args.tr_patience = 3, 2, 20, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    py = None if args.no_recbole or args.reuse_recbole else ensure_recbole_venv(Path(args.recbole_venv))

    t0 = time.perf_counter()
    world, atomic, conv = work / "world", work / "atomic", work / "from_recbole"
    synth = ROOT / ".venv" / "bin" / "transrec"
    synth = synth if synth.exists() else shutil.which("transrec") or "transrec"
    made_for = work / "data.json"  # the world the three folders below were made for
    want = {"users": args.users, "items": args.items, "min_len": args.min_len, "max_seq": args.max_seq,
            "seed": args.seed}
    made = json.loads(made_for.read_text()) if made_for.is_file() else {}
    if made.get("world") == want and (conv / "manifest.json").is_file():
        counts = made["counts"]
        log(f"reusing the world, its atomic files and their conversion in {work} (made for {want})")
    else:  # made afresh; a run training on them meanwhile would see them change: one run per --work folder
        made_for.unlink(missing_ok=True)
        run([synth, "shards", "synth", "--domain", "source", "--out", world, "--users", args.users,
             "--items", args.items, "--min-len", args.min_len, "--max-len", args.max_seq, "--image-frac", 0,
             "--seed", args.seed, "--quiet"], env=env, quiet=True)
        shutil.rmtree(atomic, ignore_errors=True)
        counts = export_atomic(world, atomic / DATASET)
        run([synth, "shards", "convert", "--format", "recbole", "--input", atomic / DATASET, "--out", conv],
            env=env, quiet=True)
        made_for.write_text(json.dumps({"world": want, "counts": counts}))
    seqs = check_round_trip(world, conv)
    n_train_users = sum(1 for s in seqs.values() if len(s) >= 2)
    lens = sorted(len(s) for s in seqs.values())
    log(f"world: {counts['users']} users, {counts['items']} items, {counts['interactions']} interactions "
        f"(lengths {lens[0]}-{lens[-1]}, median {lens[len(lens) // 2]}); round trip through RecBole's "
        f"atomic files: every sequence identical ({time.perf_counter() - t0:.0f} s)")

    rb = None
    if not args.no_recbole:
        rb = run_recbole(args, py, atomic, work, env)
        check_split(seqs, rb)
        log(f"RecBole's split = the project's: {rb['n_test_users']} users with the same validation and "
            f"test targets, {rb['n_train_samples']} training prefixes")
    tr = run_transrec(args, conv, work, env, n_train_users)
    if tr["protocol"] != {"exclude_history": False}:
        raise SystemExit(f"recbole peer: the project's run evaluated under {tr['protocol']}")

    tr_train = train_seconds(tr["records"])
    common = {**stamp(), "users": counts["users"], "items": counts["items"],
              "interactions": counts["interactions"], "seed": args.seed, "threads": args.threads,
              "protocol": "LOO TO, full ranking, history kept", "label": args.label, "tie_rule": TIE_RULE}
    rows = []
    if rb is not None:
        rb_rule = recbole_under_project_rule(rb)
        rows.append(dict(common, side="RecBole 1.2.1 SASRec", **{
            "test_ndcg@10": round(rb_rule["ndcg@10"], 4), "test_hr@10": round(rb_rule["hr@10"], 4),
            "recbole_topk_test_ndcg@10": round(rb["test"]["ndcg@10"], 4),
            "recbole_topk_test_hr@10": round(rb["test"]["hit@10"], 4),
            "tied_targets": rb_rule["tied_targets"],
            "valid_ndcg@10": round(rb["valid"].get("ndcg@10", float("nan")), 4),
            "best": f"epoch {rb['best_epoch']} of {rb['epochs']} ({rb['steps_per_epoch']} steps each)",
            "train_s": rb["fit_seconds"], "wall_s": rb.get("wall_seconds", ""),
            "cpu_s": rb.get("cpu_seconds", ""),
            "config": "recbole_config()" + (f", reused from {rb.get('date')}" if rb.get("reused") else "")}))
    rows.append(dict(common, side="transrec sasrec", **{
        "test_ndcg@10": round(tr["test"]["ndcg@10"], 4), "test_hr@10": round(tr["test"]["hr@10"], 4),
        "valid_ndcg@10": round(tr["valid"]["ndcg@10"], 4),
        "best": f"step {tr['best_step']} of {tr['last_step']}", "train_s": tr_train,
        "wall_s": tr["wall_seconds"], "cpu_s": tr["cpu_seconds"], "config": " ".join(tr["overrides"])}))

    print(f"\nSASRec on the synthetic world ({counts['users']} users, {counts['items']} items, "
          f"{counts['interactions']} interactions), RecBole's protocol: leave-one-out by time, "
          "full ranking over all items, history items not removed; test split, best step by valid NDCG@10; "
          f"torch threads: {args.threads}; {stamp()['machine']}")
    print("| side | test NDCG@10 | test HR@10 | valid NDCG@10 | best | train s | process s | process CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['test_ndcg@10']:.4f} | {r['test_hr@10']:.4f} | {r['valid_ndcg@10']:.4f} | "
              f"{r['best']} | {r['train_s']} | {r['wall_s']} | {r['cpu_s']} |")
    if rb is not None:
        print(f"\nRecBole's own evaluator (torch.topk's order among ties): test NDCG@10 "
              f"{rb['test']['ndcg@10']:.4f}, HR@10 {rb['test']['hit@10']:.4f}; {rb_rule['tied_targets']} of "
              f"{rb_rule['users']} test targets shared their score with another item")
        ratio = tr["test"]["ndcg@10"] / max(rb_rule["ndcg@10"], 1e-12)
        print(f"\ntransrec / RecBole test NDCG@10: {ratio:.3f} (target >= 0.95); training time "
              f"{tr_train} s against {rb['fit_seconds']} s")
    if not (args.dry_run or args.no_csv):
        append_rows(CSV, rows)
        print(f"rows appended to {CSV.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
