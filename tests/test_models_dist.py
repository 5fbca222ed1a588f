"""A tiny TransRec with global negatives on 2 gloo ranks equals one process over the concatenated
batch: the summed losses and the summed parameter gradients match (items shared by both ranks count
once in the softmax)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawn_ranks import run_ranks
from test_models import make_content, tiny_cfg

from transrec.models import build_model
from transrec.shards.batch import collate_windows

B_PER_RANK, L = 4, 6


def _setup():
    content = make_content(24, seed=3)
    rng = np.random.default_rng(5)
    windows = [rng.choice(24, size=int(rng.integers(3, L + 1))) for _ in range(2 * B_PER_RANK)]
    pop = rng.random(24) + 0.1
    log_q = np.log(pop / pop.sum())
    torch.manual_seed(0)
    cfg = tiny_cfg(kind="causal", text_trainable=1, image_trainable=1,
                   loss={"negatives": "global", "impl": "torch", "temperature": 0.5})
    model = build_model(cfg).eval()  # eval: BatchNorm statistics do not depend on the split

    def batch(rows):
        return collate_windows([windows[i] for i in rows], np.asarray(rows), L, content, log_q)

    return model, batch


def _summed_loss(model, batch):
    loss, metrics = model(batch)
    return loss * metrics["count"]  # the rank's summed loss (what data parallelism adds up)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, batch = _setup()
    b = batch(list(range(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)))
    total = _summed_loss(model, b)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": total.detach(), "grads": grads, "unique": b.unique_items},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_negatives_two_ranks_match_one_process(tmp_path):
    run_ranks(_worker, str(tmp_path), timeout=120)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    shared = np.intersect1d(res[0]["unique"].numpy(), res[1]["unique"].numpy())
    assert shared.size > 0  # the ranks do share items: the duplicate masking is exercised

    model, batch = _setup()
    model.criterion.cfg.negatives = "inbatch"  # one process: the concatenated batch is the global pool
    total = _summed_loss(model, batch(list(range(2 * B_PER_RANK))))
    total.backward()
    torch.testing.assert_close(res[0]["loss"] + res[1]["loss"], total.detach(), atol=1e-4, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == res[0]["grads"].keys() == res[1]["grads"].keys()
    for n, g in grads.items():
        torch.testing.assert_close(res[0]["grads"][n] + res[1]["grads"][n], g, atol=1e-4, rtol=1e-4, msg=n)
