"""RecBole's side of ``benchmarks/peers/recbole.py``: train RecBole's SASRec on atomic files, print JSON.

Runs under the RecBole virtual environment that ``recbole.py`` makes, started as
``python -P recbole_worker.py SPEC.json OUT.json`` (``-P`` keeps this folder off ``sys.path``, so
``import recbole`` finds the library and not the benchmark script beside this file).

RecBole's ``quick_start`` imports ray at module level, so the pipeline is driven here directly:
``Config`` -> ``create_dataset`` -> ``data_preparation`` -> the model -> ``Trainer.fit`` ->
``Trainer.evaluate``. The best-by-validation weights are kept in memory (RecBole's own checkpoint is a
pickled dict that torch >= 2.6 refuses to load by default), and the test split is evaluated with them.

SPEC.json: ``{"data_path", "dataset", "config": {RecBole keys}, "threads", "dump_targets"}``.
OUT.json: dataset counts, the split's validation/test targets per user (for the caller's check that
both sides see the same split), timings, the validation curve and the best epoch's metrics, and
``test_intervals``: for each test user, the target's best and worst possible rank under RecBole's own
scores and masking (``[1 + #strictly higher, that + #tied]``). RecBole's metrics take the order of
``torch.topk`` among tied items; the caller scores the intervals with the project's rule (ties in a
uniformly random order, exact expectations), so both sides are compared under one rule.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)

    torch.set_num_threads(int(spec.get("threads", 1)))
    from recbole.config import Config  # optional: recbole (RecBole's venv only)
    from recbole.data import create_dataset, data_preparation  # optional: recbole (RecBole's venv only)
    from recbole.trainer import Trainer  # optional: recbole (RecBole's venv only)
    from recbole.utils import get_model, init_seed  # optional: recbole (RecBole's venv only)

    t0 = time.perf_counter()
    cfg = dict(spec["config"], data_path=spec["data_path"])
    config = Config(model="SASRec", dataset=spec["dataset"], config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    prep_s = time.perf_counter() - t0

    class PeerTrainer(Trainer):
        """RecBole's Trainer with the best weights kept in memory and the training time counted."""

        best_state = None
        best_epoch = -1
        train_s = 0.0
        epochs_run = 0

        def _save_checkpoint(self, epoch, verbose=True, **kwargs):  # called where RecBole saves the best
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_epoch = int(epoch)

        def _train_epoch(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._train_epoch(*args, **kwargs)
            self.train_s += time.perf_counter() - t
            self.epochs_run += 1
            return out

    trainer = PeerTrainer(config, model)
    curve = []
    t_fit = time.perf_counter()

    def on_eval(epoch, score):
        curve.append({"epoch": int(epoch), "valid_ndcg@10": float(score),
                      "seconds": round(time.perf_counter() - t_fit, 2)})
        print(f"recbole: epoch {epoch} valid ndcg@10 {score:.4f} ({time.perf_counter() - t_fit:.0f} s)",
              file=sys.stderr, flush=True)

    _, best_valid = trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False,
                                callback_fn=on_eval)
    fit_s = time.perf_counter() - t_fit
    if trainer.best_state is not None:
        model.load_state_dict(trainer.best_state)
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    def rank_intervals(loader) -> list[list[int]]:
        """[best, worst] rank of each user's target, from RecBole's own full-sort scoring (padding
        item and, where RecBole masks it, the history at -inf)."""
        trainer.model.eval()
        trainer.tot_item_num = loader._dataset.item_num
        out = []
        with torch.no_grad():
            for batched in loader:
                _, scores, pos_u, pos_i = trainer._full_sort_batch_eval(batched)
                rows = scores[pos_u]
                t = scores[pos_u, pos_i][:, None]
                out += torch.stack([(rows > t).sum(1) + 1, (rows >= t).sum(1)], 1).tolist()
        return out

    def targets(loader):
        feat = loader._dataset.inter_feat
        users = dataset.id2token(dataset.uid_field, feat[dataset.uid_field].numpy())
        items = dataset.id2token(dataset.iid_field, feat[dataset.iid_field].numpy())
        return {str(u): str(i) for u, i in zip(users, items)}

    out = {
        "n_users": int(dataset.user_num - 1),  # RecBole counts the padding id 0
        "n_items": int(dataset.item_num - 1),
        "n_samples": int(dataset.inter_num),  # after RecBole's augmentation: one row per (prefix, next item)
        "n_train_samples": int(len(train_data._dataset)),
        "n_valid_users": int(len(valid_data._dataset)),
        "n_test_users": int(len(test_data._dataset)),
        "params": int(sum(p.numel() for p in model.parameters())),
        "prep_seconds": round(prep_s, 2),
        "fit_seconds": round(fit_s, 2),
        "train_seconds": round(trainer.train_s, 2),
        "epochs": trainer.epochs_run,
        "steps_per_epoch": len(train_data),
        "best_epoch": trainer.best_epoch,
        "valid": {k.lower(): float(v) for k, v in (best_valid or {}).items()},
        "test": {k.lower(): float(v) for k, v in test.items()},
        "curve": curve,
        "test_intervals": rank_intervals(test_data),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if spec.get("dump_targets"):
        out["valid_targets"] = targets(valid_data)
        out["test_targets"] = targets(test_data)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
