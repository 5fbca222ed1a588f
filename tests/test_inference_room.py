"""The inference room: serving an export without DeepSpeed, one chunked scoring pass for evaluation and
recommendation (equal to a single product at every chunk size, ties and masking included), the
room's import boundary, and the serving benchmark's quick mode."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_exports import tiny_world

from transrec.config import build_config
from transrec.engine.data import NoContent, make_loader
from transrec.engine.ranking import split_metrics
from transrec.errors import UserError
from transrec.inference.histories import dataset_sequences
from transrec.inference.metrics import target_ranks
from transrec.inference.recommender import Recommender
from transrec.inference.scoring import score_catalogue, score_matrix
from transrec.models import build_model
from transrec.shards.dataset import Dataset
from transrec.shards.format import eval_target
from transrec.shards.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic dataset and a random-init tiny content export of it."""
    data, _, exp = tiny_world(tmp_path_factory.mktemp("room"), seed=4)
    return data, exp


# Every import of deepspeed or a submodule fails (and is recorded); transformers' own availability
# probe (importlib.util.find_spec) still answers, as it does wherever deepspeed is installed.
NO_DEEPSPEED = '''
import importlib.abc, importlib.machinery, sys
attempts = []
class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        attempts.append(spec.name)
        raise ImportError(f"{spec.name} may not be imported here")
    def exec_module(self, module):
        raise ImportError(module.__name__)
class _NoDeepSpeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None
sys.meta_path.insert(0, _NoDeepSpeed())
'''

SERVE = '''
import json
import transrec
from transrec.inference.histories import dataset_sequences
rec = transrec.Recommender.from_export(EXP, device="cpu")
rec.add_items(data=DATA)
seqs = [s for _, s in dataset_sequences(DATA)][:12]
hists, targets = [s[:-1] for s in seqs], [s[-1] for s in seqs]
top = rec.recommend_many(hists, 5)
metrics = rec.evaluate(hists, targets, ks=(5,))
engine = sorted(m for m in sys.modules if m.startswith("transrec.engine"))
from transrec.cli import main
rc = main(["recommend", "--export", EXP, "--data", DATA, "--history", ",".join(hists[0]), "--k", "5",
           "--out", OUT])
loaded = sorted(m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed."))
tried = list(attempts)
try:
    import deepspeed  # noqa: F401
except ImportError:
    refused = True
else:
    refused = False
refused = refused and attempts == tried + ["deepspeed"]
print(json.dumps({"top": [r.ids for r in top], "metrics": metrics, "engine_after_api": engine, "rc": rc,
                  "loaded": loaded, "attempts": tried, "refused": refused}))
'''


@pytest.mark.slow
def test_serving_an_export_needs_no_deepspeed(world, tmp_path):
    data, exp = world
    out = tmp_path / "top.csv"
    code = NO_DEEPSPEED + f"EXP, DATA, OUT = {str(exp)!r}, {str(data)!r}, {str(out)!r}\n" + SERVE
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["refused"], "the finder did not refuse deepspeed: the test would prove nothing"
    assert res["attempts"] == [] and res["loaded"] == [], res
    assert res["engine_after_api"] == [], "the Python API loaded the training room"
    assert res["rc"] == 0
    # the same answers as a Recommender in this process (which may have loaded anything)
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    seqs = [s for _, s in dataset_sequences(data)][:12]
    hists, targets = [s[:-1] for s in seqs], [s[-1] for s in seqs]
    assert res["top"] == [r.ids for r in rec.recommend_many(hists, 5)]
    assert res["metrics"] == pytest.approx(rec.evaluate(hists, targets, ks=(5,)))
    rows = out.read_text().splitlines()
    assert rows[0] == "user,rank,item,score" and [r.split(",")[2] for r in rows[1:]] == res["top"][0]


# ----------------------------------------------------------------------------- chunked scoring

def _integer_case(seed: int = 0, b: int = 11, n: int = 37, d: int = 3):
    """Users and items with small integer entries (every score exact, many ties), history pairs
    (some of them the user's own target), and targets."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(-2, 3, (b, d), generator=g).float()
    items = torch.randint(-1, 2, (n, d), generator=g).float()
    targets = torch.randint(0, n, (b,), generator=g)
    rows = torch.randint(0, b, (4 * b,), generator=g)
    cols = torch.randint(0, n, (4 * b,), generator=g)
    rows, cols = torch.cat([rows, torch.arange(3)]), torch.cat([cols, targets[:3]])  # targets seen before
    return users, items, targets, rows, cols


def _reference_top(scores: torch.Tensor, k: int) -> tuple[list, list]:
    """Top k of each row by (score descending, column ascending), item by item."""
    cols = [sorted(range(scores.shape[1]), key=lambda j, r=r: (-float(r[j]), j))[:k] for r in scores]
    return [[float(scores[i, j]) for j in c] for i, c in enumerate(cols)], cols


@pytest.mark.parametrize("with_columns", [False, True], ids=["whole-table", "candidate-columns"])
@pytest.mark.parametrize("chunk_of", ["1", "7", "n-1", "n", "2n"])
def test_chunked_scoring_equals_one_product_with_ties_and_masking(chunk_of, with_columns):
    users, table, targets, rows, cols = _integer_case()
    if with_columns:  # candidates: a shuffled subset of a larger table
        extra = torch.randint(-1, 2, (9, table.shape[1]), generator=torch.Generator().manual_seed(1)).float()
        perm = torch.randperm(table.shape[0] + 9, generator=torch.Generator().manual_seed(2))
        big = torch.empty(table.shape[0] + 9, table.shape[1])
        big[perm[: table.shape[0]]] = table
        big[perm[table.shape[0]:]] = extra
        items, columns = big, perm[: table.shape[0]]
    else:
        items, columns = table, None
    n = table.shape[0]
    chunk = {"1": 1, "7": 7, "n-1": n - 1, "n": n, "2n": 2 * n}[chunk_of]
    full = score_matrix(users, table, l2=False)
    masked = full.clone()
    masked[rows, cols] = float("-inf")
    for k in (5, n):
        got = score_catalogue(users, items, l2=False, chunk=chunk, columns=columns, k=k, masked=(rows, cols),
                              targets=targets, unmasked_ranks=True, keep_rows=torch.tensor([4, 0]))
        want_scores, want_cols = _reference_top(masked, k)
        assert got.top_columns.tolist() == want_cols
        assert got.top_scores.tolist() == want_scores
        assert torch.equal(got.ranks, target_ranks(full, targets, rows, cols))
        assert torch.equal(got.unmasked_ranks, target_ranks(full, targets))
        assert torch.equal(got.rows, full[[4, 0]]) and int(got.nonfinite) == 0
        one = score_catalogue(users, items, l2=False, chunk=n, columns=columns, k=k, masked=(rows, cols),
                              targets=targets, unmasked_ranks=True)
        for field in ("top_scores", "top_columns", "ranks", "unmasked_ranks"):
            assert torch.equal(getattr(got, field), getattr(one, field)), field
    assert (got.ranks[:, 1] > got.ranks[:, 0]).any(), "the case must hold ties with targets"
    assert not torch.equal(got.ranks, got.unmasked_ranks)


def test_chunked_cosine_scores_are_the_normalised_products():
    g = torch.Generator().manual_seed(3)
    users, items = torch.randn(6, 8, generator=g) * 3, torch.randn(50, 8, generator=g) * 5
    want = torch.nn.functional.normalize(users, dim=1) @ torch.nn.functional.normalize(items, dim=1).T
    got = score_catalogue(users, items, l2=True, chunk=9, k=4, targets=torch.arange(6))
    ref = torch.sort(want, dim=1, descending=True)
    assert torch.equal(got.top_columns, ref.indices[:, :4])
    torch.testing.assert_close(got.top_scores, ref.values[:, :4])
    assert torch.equal(got.ranks, target_ranks(want, torch.arange(6)))


def test_scoring_counts_non_finite_scores_and_never_ranks_nan_first():
    users, items = torch.ones(2, 2), torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]])
    got = score_catalogue(users, items, l2=False, chunk=2, k=3)
    assert int(got.nonfinite) == 2
    assert got.top_columns.tolist() == [[2, 0, 1]] * 2 and got.top_scores[:, 2].isinf().all()


# ----------------------------------------------------------------------------- evaluation and serving

@pytest.fixture(scope="module")
def exact_model(tmp_path_factory):
    """An ID model whose every score is exact in float32: item embeddings in {-1, 0, 1}, user states
    rounded to multiples of 1/8, so every tie is a true tie at any chunk size."""
    data = synthesize(tmp_path_factory.mktemp("exact") / "w", domain="target", n_users=60, n_items=37, seed=6,
                      min_len=4, max_len=9)
    ds = Dataset.open(data)
    cfg = build_config("tiny", overrides=["model.kind=id", "model.dim=4", "model.user.heads=1",
                                          "eval.batch_size=16", "data.max_len=6", "model.user.max_len=6",
                                          "model.loss.l2_normalize=false", f"data.path={data}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, n_items=ds.n_items).eval()
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.randint(-1, 2, model.item_emb.weight.shape).float())
    encode_users = model.encode_users
    model.encode_users = lambda emb, mask: torch.round(encode_users(emb, mask) * 8) / 8
    return data, ds, cfg, model


def test_evaluation_and_the_recommender_agree_at_every_chunk_size(exact_model):
    data, ds, cfg, model = exact_model
    n = ds.n_items
    content = NoContent(ds)
    results, tops = [], []
    hists, targets = [], []
    for _, seq in dataset_sequences(data):
        held = eval_target(seq, "test")
        if held is not None:
            hists.append(list(held[0]))
            targets.append(held[1])
    for chunk in (1, 7, n - 1, n, 2 * n):
        loader = make_loader(cfg, ds, content, "test", batch_size=16, rank=0, world=1, seed=0)
        got = split_metrics(model, loader, content, ks=(1, 5, 10), item_chunk=8, show=False,
                            score_chunk=chunk)
        results.append(got)
        rec = Recommender(model, cfg, device="cpu", score_chunk=chunk)
        rec.add_items(data=data)
        direct = rec.evaluate(hists, targets, ks=(1, 5, 10))
        for key in ("hr@1", "hr@5", "ndcg@10", "mrr", "users"):
            assert direct[key] == pytest.approx(got[key], abs=1e-12), (chunk, key)
        tops.append([(r.ids, r.scores) for r in rec.recommend_many(hists, 10)])
    assert all(r == results[0] for r in results[1:])
    assert all(t == tops[0] for t in tops[1:])
    with pytest.raises(UserError, match="score_chunk must be at least 1"):
        Recommender(model, cfg, device="cpu", score_chunk=0)


# ----------------------------------------------------------------------------- the room's boundary

ALLOWED = ("transrec.inference", "transrec.models", "transrec.shards", "transrec.errors", "transrec.config",
           "transrec.storage", "transrec._toplevel")


@pytest.mark.parametrize("path", sorted((ROOT / "inference").glob("*.py")), ids=lambda p: p.name)
def test_the_inference_room_imports_no_training_stack(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            names.add("relative import")
    bad = sorted(m for m in names if m == "relative import" or m.split(".")[0] == "deepspeed"
                 or (m.split(".")[0] == "transrec" and not any(m == a or m.startswith(a + ".")
                                                                for a in ALLOWED)))
    assert not bad, f"inference/{path.name} imports {bad}"


@pytest.mark.slow
def test_the_serving_benchmark_runs_quick(tmp_path):
    csv = ROOT / "benchmarks" / "results" / "recommend.csv"
    before = csv.read_bytes() if csv.is_file() else None
    proc = subprocess.run([sys.executable, "benchmarks/recommend_bench.py", "--quick", "--no-csv", "--work",
                           str(tmp_path / "work")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    table = [ln for ln in lines if ln.startswith(("| 256 |", "| full |"))]
    assert len(table) == 2 and all(float(ln.split("|")[2]) > 0 for ln in table), proc.stdout
    assert any("same top-10 ids at every chunk size: yes" in ln for ln in lines), proc.stdout
    assert (csv.read_bytes() if csv.is_file() else None) == before, "--no-csv wrote rows"
