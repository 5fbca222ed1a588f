"""The loss's candidate sets beyond the batch: the negative memory (FIFO, its softmax against a
float64 reference, no gradient into the memory, state through a state dict) and the content
model's catalogue softmax (refreshed table, exact mode, both against references), plus the config
names old runs wrote."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models import make_batch, make_content, tiny_cfg

from transrec.config import Config
from transrec.config.overrides import from_dict, set_key
from transrec.errors import ConfigError
from transrec.models import LossConfig, build_model
from transrec.models.losses import Criterion
from transrec.models.negatives import STATE_PREFIX, CatalogueTable, NegativeMemory, step_buffers


@pytest.fixture(scope="module")
def content():
    return make_content(30, seed=3)


# ---------------------------------------------------------------------------------------------
# the memory


def test_memory_is_a_fifo_that_leaves_out_the_batch_items():
    mem = NegativeMemory(5, 2)
    assert mem.filled() == 0 and mem.candidates(torch.tensor([0]))[0].shape == (0, 2)
    keys = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    mem.push(keys[:3], torch.tensor([10, 11, 12]), torch.tensor([-1.0, -2.0, -3.0]))
    mem.push(keys[3:7], torch.tensor([13, 14, 15, 16]), torch.tensor([-4.0, -5.0, -6.0, -7.0]))
    # 7 pushed into 5 slots: the two oldest (items 10, 11) are gone, the rest kept with their log q
    assert sorted(mem.items.tolist()) == [12, 13, 14, 15, 16] and int(mem.head) == 2
    k, lq = mem.candidates(torch.tensor([14, 99]))
    got = {tuple(r): float(q) for r, q in zip(k.tolist(), lq.tolist())}
    assert got == {(4.0, 5.0): -3.0, (6.0, 7.0): -4.0, (10.0, 11.0): -6.0, (12.0, 13.0): -7.0}
    mem.push(keys, torch.arange(20, 27), torch.zeros(7))  # more than the memory: the newest 5 stay
    assert sorted(mem.items.tolist()) == [22, 23, 24, 25, 26]


def _memory_reference(q, keys, target, valid, log_q, mem_keys, mem_log_q, tau):
    logits = torch.cat([q @ keys.T, q @ mem_keys.T], dim=1) / tau - torch.cat([log_q, mem_log_q])
    return F.cross_entropy(logits[valid], target[valid], reduction="sum")


def test_memory_softmax_against_a_float64_reference():
    """Step 2 scores the batch's keys and the memory's entries of step 1 whose items are not in
    the batch, with the logQ bias on both (the reported loss); the user states' gradient is that
    softmax's with every key detached, the keys' gradient the in-batch softmax's with the user
    states detached; no gradient reaches the memory; the batch goes in after."""
    g = torch.Generator().manual_seed(0)
    tau = 0.7
    crit = Criterion(LossConfig(negatives="memory", memory_size=16, impl="torch", temperature=tau), dim=8)
    crit.double().train()
    items1 = torch.tensor([1, 2, 3, 4, 5, 6])
    keys1 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    lq1 = -torch.rand(6, generator=g, dtype=torch.float64) - 1
    q1 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    crit(q1, keys1, torch.tensor([0, 1, 2, 5]), torch.ones(4, dtype=torch.bool), lq1, items1)
    assert crit.memory.filled() == 6

    items2 = torch.tensor([2, 5, 7, 8])  # items 2 and 5 were in step 1: their old copies drop out
    keys2 = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lq2 = -torch.rand(4, generator=g, dtype=torch.float64) - 1
    q2 = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1, 2, 0])
    valid = torch.tensor([True, True, False, True, True])
    memory_before = crit.memory.keys.clone()
    loss, metrics = crit(q2, keys2, target, valid, lq2, items2)
    old = torch.tensor([0, 2, 3, 5])  # step-1 rows of items 1, 3, 4, 6
    n = valid.sum()
    ref = _memory_reference(q2, keys2, target, valid, lq2, keys1[old], lq1[old], tau) / n
    torch.testing.assert_close(metrics["loss"], ref.detach(), rtol=1e-12, atol=1e-12)
    assert int(metrics["num_keys"]) == 4 + 4
    loss.backward()
    want_q, = torch.autograd.grad(
        _memory_reference(q2, keys2.detach(), target, valid, lq2, keys1[old], lq1[old], tau) / n, q2)
    inbatch = F.cross_entropy((q2.detach() @ keys2.T / tau - lq2)[valid], target[valid], reduction="sum") / n
    want_k, = torch.autograd.grad(inbatch, keys2)
    torch.testing.assert_close(q2.grad, want_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(keys2.grad, want_k, rtol=1e-10, atol=1e-12)
    assert not crit.memory.keys.requires_grad
    torch.testing.assert_close(crit.memory.keys[:6], memory_before[:6])  # step 1's entries unchanged
    assert crit.memory.items.tolist()[:10] == [1, 2, 3, 4, 5, 6, 2, 5, 7, 8]  # step 2's batch pushed in


def test_memory_is_training_state_in_the_state_dict_but_not_in_an_export(content, tmp_path):
    cfg = tiny_cfg(loss={"negatives": "memory", "memory_size": 64, "impl": "torch"})
    model = build_model(cfg).train()
    model(make_batch(content, seed=4))
    sd = model.state_dict()
    assert sd["criterion.memory.items"].ge(0).sum() > 0
    assert {id(b) for b in step_buffers(model)} == {id(b) for b in model.criterion.memory.buffers()}
    fresh = build_model(tiny_cfg(loss={"negatives": "memory", "memory_size": 8, "impl": "torch"}))
    fresh.load_state_dict(sd)  # a checkpoint's memory, whatever size the new module was built with
    assert torch.equal(fresh.criterion.memory.keys, model.criterion.memory.keys)
    out = model.save_export(tmp_path / "exp", Config(model=cfg), {"kind": "full", "step": 1})
    back = type(model).from_export(out)
    for k, v in model.state_dict().items():
        if not k.startswith(STATE_PREFIX):
            torch.testing.assert_close(back.state_dict()[k], v.float() if v.is_floating_point() else v)
    assert back.criterion.memory.filled() == 0  # an export carries weights, not the training state


# ---------------------------------------------------------------------------------------------
# the content model's catalogue softmax


def _catalogue_model(content, refresh: int):
    torch.manual_seed(0)
    cfg = tiny_cfg(dropout=0.0, loss={"negatives": "catalogue", "catalogue_refresh": refresh,
                                      "impl": "torch", "temperature": 0.5})
    return build_model(cfg, n_items=content.n_items).double()


def _encode_all(model, content):
    items = torch.arange(content.n_items)
    text, image = content.gather(items.numpy())
    return model.encode_items(items, text, image)


def _catalogue_reference(model, batch, keys):
    out = model.user(model.encode_items(batch.unique_items, batch.text, batch.image)[batch.inverse[:, :-1]],
                     batch.mask[:, :-1])
    q = out[:, -1]
    target, valid = model.targets(batch)
    logits = q @ keys.T / 0.5
    return F.cross_entropy(logits[valid], batch.unique_items[target][valid], reduction="mean")


def test_catalogue_table_is_refreshed_then_scored_with_the_batch_items_fresh(content):
    model = _catalogue_model(content, refresh=3)
    model.eval()  # no dropout or BatchNorm updates: the reference recomputes the same values
    batch = make_batch(content, seed=5, min_len=3)
    assert model.catalogue_due(0)
    with pytest.raises(ConfigError, match="never encoded"):
        model(batch)
    with torch.no_grad():
        stale = _encode_all(model, content)
    model.refresh_catalogue(stale, step=0)
    assert not model.catalogue_due(1) and not model.catalogue_due(2) and model.catalogue_due(3)
    with torch.no_grad():  # the encoders move on: the table is stale, the batch's items are not
        for p in model.text_encoder.proj.parameters():
            p.add_(0.05)
    loss, metrics = model(batch)
    keys = stale.clone()
    fresh = model.encode_items(batch.unique_items, batch.text, batch.image)
    keys[batch.unique_items] = fresh.detach()
    torch.testing.assert_close(metrics["loss"], _catalogue_reference(model, batch, keys).detach(),
                               rtol=1e-10, atol=1e-12)
    assert int(metrics["num_keys"]) == content.n_items
    loss.backward()
    assert model.text_encoder.proj.weight.grad.abs().sum() > 0  # through the batch's own items


def test_exact_catalogue_encodes_every_item_with_gradient(content):
    """catalogue_refresh=0: every item is encoded at every step with gradient; right after a
    refresh, the refreshed mode gives the same loss (same weights, no dropout)."""
    exact = _catalogue_model(content, refresh=0).eval()
    batch = make_batch(content, seed=6, min_len=3)
    with pytest.raises(ConfigError, match="set_catalogue_content"):
        exact(batch)
    exact.set_catalogue_content(content)
    loss, _ = exact(batch)
    ref = _catalogue_reference(exact, batch, _encode_all(exact, content))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    refreshed = _catalogue_model(content, refresh=5).eval()
    refreshed.load_state_dict(exact.state_dict(), strict=False)
    with torch.no_grad():
        refreshed.refresh_catalogue(_encode_all(refreshed, content), step=0)
    loss_r, metrics_r = refreshed(batch)
    torch.testing.assert_close(metrics_r["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    # same loss, other gradients: the exact mode's also flow through the items outside the batch
    outside = torch.ones(content.n_items, dtype=torch.bool)
    outside[batch.unique_items] = False
    assert outside.any()
    loss.backward()
    loss_r.backward()
    g_exact, g_table = exact.text_encoder.proj.weight.grad, refreshed.text_encoder.proj.weight.grad
    assert g_exact.abs().sum() > 0 and not torch.allclose(g_exact, g_table, rtol=1e-3, atol=1e-8)


def test_catalogue_table_resizes_to_a_checkpoint():
    t = CatalogueTable(0, 4, refresh=2)
    t.load_state_dict({"table": torch.ones(7, 4), "encoded_at": torch.tensor(3)})
    assert t.table.shape == (7, 4) and int(t.encoded_at) == 3 and t.due(5) and not t.due(4)


# ---------------------------------------------------------------------------------------------
# names


def test_old_names_of_the_loss_choices_still_load():
    cfg = from_dict({"model": {"loss": {"kind": "inbatch", "negatives": "local"}}})
    assert cfg.model.loss.kind == "softmax" and cfg.model.loss.negatives == "inbatch"
    c = Config()
    set_key(c, "model.loss.negatives", "memory")
    assert c.model.loss.negatives == "memory"
    with pytest.raises(ConfigError, match="model.loss.negatives"):
        set_key(c, "model.loss.negatives", "everything")
