"""Engine pieces in one process, no DeepSpeed: schedule, parameter groups, checkpoint discovery,
full-ranking evaluation against a brute-force numpy reference, metrics log and plots."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from transrec.config import build_config, save_yaml
from transrec.engine.checkpoint import TMP_PREFIX, CheckpointManager, ClientState
from transrec.engine.data import NoContent, make_loader
from transrec.engine.optim import WarmupCosine, frozen_by_rate_warning, make_optimizer
from transrec.engine.plot import plot_runs, run_label, validation_note
from transrec.engine.ranking import split_metrics
from transrec.engine.tracking import Tracker, read_metrics
from transrec.engine.transfer import format_table
from transrec.models import build_model
from transrec.shards.dataset import Dataset
from transrec.shards.synth import synthesize


def test_warmup_then_cosine_to_the_floor():
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [round(f(s), 6) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    after = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine


def test_item_encoders_get_their_own_learning_rate_and_no_decay_on_norms():
    cfg = build_config("tiny", overrides=["optim.lr=0.01", "optim.encoder_lr=0.001"])
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.optim)
    enc = {id(p) for p in model.param_groups()["encoders"]}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in opt.param_groups:
        for p in g["params"]:
            seen.add(id(p))
            assert g["lr"] == (0.001 if id(p) in enc else 0.01), names[id(p)]
            if "norm" in names[id(p)].lower() or names[id(p)].endswith("bias"):
                assert g["weight_decay"] == 0.0, names[id(p)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert seen == trainable and enc & trainable and trainable - enc


class _FilesOnlyEngine:
    """Writes one file per save the way DeepSpeed lays out a tag folder (files under dir/tag)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.arange(4)}, Path(save_dir, tag, "mp_rank_00_model_states.pt"))


def test_checkpoints_keep_last_k_and_never_take_a_damaged_or_partial_one(tmp_path):
    ck = CheckpointManager(tmp_path, keep_last=2)
    eng = _FilesOnlyEngine()
    for step in (1, 2, 3):
        ck.save(eng, ClientState(step=step, epoch=0, cursor=step * 8, seed=0), world_size=1, zero_stage=0,
                precision="fp32")
    assert ck.complete() == ["step-00000002", "step-00000003"] and ck.latest() == "step-00000003"
    assert json.loads((ck.dir / "step-00000003" / "manifest.json").read_text())["client"]["cursor"] == 24
    (ck.dir / f"{TMP_PREFIX}step-00000004").mkdir()  # a save in progress or killed
    assert ck.latest() == "step-00000003"
    with open(ck.dir / "step-00000003" / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"torn")  # damaged after the fact: the size no longer matches the manifest
    assert ck.latest() == "step-00000002"
    (ck.dir / "latest").write_text("step-00000009")  # a pointer to nothing: the scan decides
    assert ck.latest() == "step-00000002"


def _eval_world(tmp_path):
    return synthesize(tmp_path / "w", domain="target", n_users=70, n_items=40, seed=5, min_len=4, max_len=9)


@pytest.mark.parametrize("exclude_history", [True, False], ids=["history-removed", "history-ranked"])
def test_evaluation_equals_a_brute_force_reference_with_ties_and_masking(tmp_path, exclude_history):
    ds = Dataset.open(_eval_world(tmp_path))
    cfg = build_config("tiny", overrides=["model.kind=id", "model.dim=4", "model.user.heads=1",
                                          "eval.batch_size=16", "data.max_len=6", "model.user.max_len=6",
                                          "model.loss.l2_normalize=false"])
    torch.manual_seed(0)
    model = build_model(cfg.model, n_items=ds.n_items).eval()
    with torch.no_grad():  # few distinct embeddings: many tied scores
        model.item_emb.weight.copy_(torch.randint(-1, 2, model.item_emb.weight.shape).float())
    # User states rounded to multiples of 1/8: every score is then exact in float32 whatever order a
    # matrix product sums in, so a tie is a true tie on both sides of the comparison.
    encode_users = model.encode_users
    model.encode_users = lambda emb, mask: torch.round(encode_users(emb, mask) * 8) / 8
    content = NoContent(ds)
    loader = make_loader(cfg, ds, content, "test", batch_size=16, rank=0, world=1, seed=0)
    got = split_metrics(model, loader, content, ks=(1, 5, 10), item_chunk=7, show=False,
                   exclude_history=exclude_history)

    table = model.item_emb.weight.detach().numpy().astype(np.float64)
    ranks, other_ranks, seen_users, ties, history_above = [], [], set(), 0, 0
    for batch in make_loader(cfg, ds, content, "test", batch_size=16, rank=0, world=1, seed=0):
        with torch.no_grad():
            emb = model.item_emb.weight[batch.seq[:, :-1].clamp(min=0)]
            user = model.encode_users(emb, batch.mask[:, :-1])
        for b in range(batch.batch_size):
            if not bool(batch.row_valid[b]) or int(batch.users[b]) in seen_users:
                continue
            seen_users.add(int(batch.users[b]))
            target = int(batch.seq[b, -1])
            seen_before = set(batch.hist_items[batch.hist_rows == b].tolist()) - {target}
            hist = seen_before if exclude_history else set()
            s = table @ user[b].double().numpy()
            other = set() if exclude_history else seen_before  # the other protocol, reported beside
            other_ranks.append(_interval(s, target, other, ds.n_items))
            ties += sum(1 for j in range(ds.n_items) if j != target and s[j] == s[target])
            history_above += any(s[j] > s[target] for j in seen_before)  # where the protocols differ
            ranks.append(_interval(s, target, hist, ds.n_items))
    assert ties > 0 and history_above > 0 and got["users"] == len(ranks) > 20
    assert any(w > b for b, w in ranks)  # some targets share their score with other items
    _assert_expected(got, "", ranks)
    assert other_ranks != ranks
    _assert_expected(got, "unmasked_" if exclude_history else "masked_", other_ranks)


def _interval(s, target, masked, n):
    """(best, worst) rank of ``target`` among the items not in ``masked``, counted item by item."""
    above = sum(1 for j in range(n) if j not in masked and j != target and s[j] > s[target])
    tied = sum(1 for j in range(n) if j not in masked and j != target and s[j] == s[target])
    return 1 + above, 1 + above + tied


def _assert_expected(got, prefix, intervals):
    """Each user's metrics are the mean over every rank of their interval (ties in a uniformly
    random order), then the mean over users."""
    def mean(f):
        return float(np.mean([np.mean([f(r) for r in range(b, w + 1)]) for b, w in intervals]))

    for k in (1, 5, 10):
        assert got[f"{prefix}hr@{k}"] == pytest.approx(mean(lambda r, k=k: float(r <= k)), abs=1e-9)
        assert got[f"{prefix}ndcg@{k}"] == pytest.approx(
            mean(lambda r, k=k: 1 / math.log2(r + 1) if r <= k else 0.0), abs=1e-9)
    assert got[f"{prefix}mrr"] == pytest.approx(mean(lambda r: 1 / r), abs=1e-9)


def test_a_constant_score_model_evaluates_at_chance_and_warns_of_collapse(tmp_path, capsys):
    """Every item scores the same (the item table zeroed): the ranking is a coin toss among all
    items, never a win for the target; distinct_scores says so and one warning line is logged."""
    ds = Dataset.open(_eval_world(tmp_path))
    cfg = build_config("tiny", overrides=["model.kind=id", "model.loss.l2_normalize=false"])
    model = build_model(cfg.model, n_items=ds.n_items).eval()
    with torch.no_grad():
        model.item_emb.weight.zero_()  # every item scores 0 for every user
    content = NoContent(ds)
    loader = make_loader(cfg, ds, content, "valid", batch_size=32, rank=0, world=1, seed=0)
    got = split_metrics(model, loader, content, ks=(5, 10), item_chunk=16, show=False)
    n = ds.n_items
    assert got["users"] == sum(s.n_eval for s in ds.seq_shards)
    assert got["unmasked_hr@5"] == pytest.approx(5 / n, abs=1e-12)
    assert got["unmasked_hr@10"] == pytest.approx(10 / n, abs=1e-12)
    assert got["unmasked_mrr"] == pytest.approx(math.fsum(1 / r for r in range(1, n + 1)) / n, abs=1e-12)
    assert 5 / n < got["hr@5"] < 5 / (n - 9)  # chance among what the masked history leaves
    assert got["distinct_scores"] == pytest.approx(1 / n, abs=1e-12)
    assert capsys.readouterr().err.count("item tower has collapsed") == 1


def test_metrics_log_and_plot(tmp_path):
    tr = Tracker(tmp_path / "run", tensorboard=True)
    for step in range(1, 6):
        tr.log("train", step, loss=5.0 - step * 0.3, lr=0.001)
    tr.log("eval", 5, split="valid", **{"ndcg@10": 0.1})
    tr.close()
    recs = read_metrics(tmp_path / "run")
    assert [r["kind"] for r in recs].count("train") == 5 and recs[-1]["ndcg@10"] == 0.1
    assert any((tmp_path / "run" / "tb").iterdir())  # TensorBoard event file
    png = plot_runs([tmp_path / "run"], tmp_path / "curves.png")
    assert png.stat().st_size > 5000


def test_plot_legends_tell_runs_apart_and_a_lone_validation_point_is_explained(tmp_path):
    for parent, mode in (("a", "full"), ("b", "full")):
        run = tmp_path / parent / mode
        run.mkdir(parents=True)
        cfg = build_config("tiny", overrides=[f"run.init_from={tmp_path / 'exports' / 'pre'}"])
        save_yaml(cfg, run / "config.yaml")
    labels = {run_label(tmp_path / p / "full") for p in ("a", "b")}
    assert labels == {"a/full (from pre)", "b/full (from pre)"}  # same base name, told apart
    lora = tmp_path / "c" / "lora"
    lora.mkdir(parents=True)
    save_yaml(build_config("tiny", overrides=["model.text.lora=true"]), lora / "config.yaml")
    assert run_label(lora) == "c/lora (lora)"
    assert validation_note({"x": 1, "y": 0}).startswith("no validation curve")
    assert validation_note({"x": 1, "y": 3}) is None


def test_comparison_table_shows_the_protocol_its_main_columns_do_not():
    masked = {"mode": "full", "test_ndcg@10": 0.31, "test_hr@10": 0.52, "test_unmasked_ndcg@10": 0.21,
              "test_unmasked_hr@10": 0.42, "exclude_history": True}
    head, _, row = format_table([masked]).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert "NDCG@10 history masked" not in cols  # the main columns are that protocol already
    assert cells["NDCG@10"] == "0.3100" and cells["NDCG@10 history ranked"] == "0.2100"
    assert cells["HR@10 history ranked"] == "0.4200"
    ranked = {"mode": "id", "test_ndcg@10": 0.2, "test_masked_ndcg@10": 0.25, "exclude_history": False}
    head, _, r1, r2 = format_table([masked, ranked]).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = dict(zip(cols, (c.strip() for c in r2.strip("|").split("|"))))
    assert cells["NDCG@10 history masked"] == "0.2500" and cells["NDCG@10 history ranked"] == "0.2000"


def test_trainable_encoders_under_a_zero_encoder_rate_get_a_warning():
    zero = build_config("tiny", overrides=["optim.encoder_lr=0"])
    line = frozen_by_rate_warning(build_model(zero.model), zero.optim)
    assert line and line.startswith("warning: optim.encoder_lr=0 but ") and "never move" in line
    frozen = build_config("tiny", overrides=["optim.encoder_lr=0", "model.text.trainable=none",
                                              "model.image.trainable=none"])
    assert frozen_by_rate_warning(build_model(frozen.model), frozen.optim) is None
    moving = build_config("tiny")
    assert frozen_by_rate_warning(build_model(moving.model), moving.optim) is None
    ids = build_config("sasrec")  # the ID model has no item encoder (and the preset's rate is 0)
    assert ids.optim.encoder_lr == 0
    assert frozen_by_rate_warning(build_model(ids.model, n_items=10), ids.optim) is None
