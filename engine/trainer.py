"""The training loop on DeepSpeed: config -> data, model, optimizer -> engine -> steps, evaluations,
checkpoints.

One optimizer step consumes ``data.batch_size`` sequences: ``micro x accumulation x world``. Each
micro-batch goes forward through the model (one encoder pass per modality over its unique items,
in-batch softmax over them), ``engine.backward`` scales by the accumulation and reduces across
ranks (ZeRO 0-3), ``engine.step`` clips (``optim.grad_clip``), steps AdamW and the warmup+cosine
schedule at the accumulation boundary.

What a resumed run needs to continue exactly lives in the checkpoint: DeepSpeed's states (weights,
optimizer moments, schedule) plus ours (:class:`~transrec.engine.checkpoint.ClientState`: step,
epoch, the global sample cursor of the loader, the seed) and every rank's RNG. The loader's order is
a pure function of (seed, epoch, cursor), so the resumed run sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transrec.engine import distributed as D
from transrec.engine.checkpoint import CheckpointManager, ClientState
from transrec.engine.evaluate import evaluate
from transrec.engine.optim import make_optimizer, make_scheduler
from transrec.engine.tracking import Tracker, progress
from transrec.models.prefix import maybe_wrap

from transrec.config import Config, batch_layout, save_yaml, to_deepspeed, validate
from transrec.errors import ConfigError, UserError


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_data(cfg: Config, path: str | None = None, *, show: bool = False):
    """(Dataset, ItemCache or None) for ``path`` (default ``data.path``) as the model config needs."""
    from transrec.shards.dataset import Dataset

    path = path or cfg.data.path
    if not path:
        raise ConfigError("no dataset: pass --data DIR (or data.path=DIR)")
    ds = Dataset.open(path)
    if cfg.model.kind == "id":
        return ds, NoContent(ds)
    from transrec.shards.cache import build_or_load_item_cache

    content = build_or_load_item_cache(ds, cache_dir=cfg.data.cache_dir or None, **content_spec(cfg.model),
                                       progress=show)
    return ds, content


class NoContent:
    """The content source of the ID baseline: item indices only, no titles or pictures."""

    def __init__(self, ds):
        self.n_items = int(ds.n_items)
        self.modality = np.asarray(ds.modality, dtype=np.int8)

    def gather(self, items):
        return None, None


def content_spec(model_cfg) -> dict:
    """What the item cache must hold for this model: tokenizer folder, title length, image size."""
    from transrec.models.text import tokenizer_path

    return {"tokenizer": tokenizer_path(model_cfg.text.name), "max_text_len": int(model_cfg.text.max_len),
            "image_size": int(model_cfg.image.image_size)}


def make_loader(cfg: Config, ds, content, split: str, *, batch_size: int, rank: int, world: int,
                start_cursor: int = 0, seed: int | None = None, max_len: int | None = None):
    from transrec.shards.loader import SequenceLoader

    return SequenceLoader(ds, content, split=split, batch_size=batch_size,
                          max_len=max_len or cfg.data.max_len, seed=cfg.run.seed if seed is None else seed,
                          rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                          policy=cfg.data.policy, start_cursor=start_cursor)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step (rank-local mean)
    metrics: dict = field(default_factory=dict)  # final evaluation per split
    seconds: float = 0.0
    sequences: int = 0


def _single_process_fast_path(engine) -> None:
    """One process, ZeRO-0, fp32: drop DeepSpeed's per-tensor work that has nothing to do.

    - The gradient all-reduce over a group of one rank (it flattens every gradient into a buffer,
      reduces it and copies it back): switched off. It also gave a parameter without a gradient a zero
      one; :class:`~transrec.engine.optim.FlatAdamW` steps such a parameter with zeros, as before.
    - Gradient clipping: the same computation (global 2-norm of the per-tensor norms, coefficient
      ``min(1, clip / (norm + 1e-6))``) with foreach kernels, without the all-reduce of the norm over
      one rank, instead of a norm and a multiply per tensor.

    Both loops cost 2-3 ms a step on idle cores and several times that when other processes hold them.
    """
    engine.enable_backward_allreduce = False
    max_norm = torch.tensor(float(engine.gradient_clipping()))

    def clip_fp32_gradients():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        total = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().float().pow(0.5)
        coef = torch.clamp(max_norm.to(total.device) / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    engine.clip_fp32_gradients = clip_fp32_gradients


class Trainer:
    """Owns one DeepSpeed engine. ``Trainer(cfg).fit()`` is ``transrec train``.

    Hooks for tests and tools: ``after_step(trainer, step)`` callbacks run after every optimizer
    step (``step`` counts completed steps; benchmarks time steady-state steps with it);
    ``after_backward(trainer, step)`` callbacks run after every
    backward of a micro-batch (gradients are reduced at the accumulation boundary).
    """

    def __init__(self, cfg: Config, *, data=None, show: bool | None = None):
        self.cfg = cfg
        self.rank, self.local_rank, self.world = D.init(cfg.deepspeed.backend)
        validate(cfg, self.world)
        self.micro, self.accum = batch_layout(cfg, self.world)
        self.show = (cfg.run.progress if show is None else show) and self.rank == 0
        self.device = D.device()
        if not cfg.run.out:
            raise ConfigError("no run folder: pass --out RUN (or run.out=RUN)")
        self.run_dir = Path(cfg.run.out)
        seed_everything(cfg.run.seed)
        self.ds, self.content = data if data is not None else open_data(cfg, show=self.show)
        self.model = self._build_model()
        # The frozen-prefix cache is built from the whole fp32 weights, before any cast or
        # partitioning; training and evaluation then gather items through the same wrapper.
        self.content = maybe_wrap(self.content, self.model, cfg.data, progress=self.show,
                                  log=print if self.rank == 0 else (lambda _msg: None))
        if cfg.deepspeed.precision == "bf16":
            # DeepSpeed casts parameters to bf16 but leaves buffers (BatchNorm running statistics,
            # pixel mean/std) in fp32, which mixed-dtype kernels refuse: cast the whole module first.
            # The optimizer still keeps fp32 master weights (DeepSpeed's bf16 optimizer).
            self.model.to(torch.bfloat16)
        self.ds_config = to_deepspeed(cfg, self.world)
        # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers flatten the weights themselves; without them
        # the AdamW gets one flat tensor per group from FlatAdamW (see engine.optim).
        flat = self.zero_stage == 0 and not any(self.ds_config.get(k, {}).get("enabled")
                                                for k in ("bf16", "fp16"))
        self.optimizer = make_optimizer(self.model, cfg.optim, flat=flat)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim)
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler, config=self.ds_config)
        if flat and self.world == 1:
            _single_process_fast_path(self.engine)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.run.keep_last)
        self.state = ClientState(step=0, epoch=0, cursor=0, seed=cfg.run.seed)
        self.after_backward: list = []
        self.after_step: list = []
        self.items_encoded = 0  # unique items through the encoders (throughput accounting)
        self.tracker = Tracker(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.run.tensorboard)

    # -- set-up ---------------------------------------------------------------------------
    def _build_model(self):
        from transrec.models import build_model

        model = build_model(self.cfg.model, n_items=self.ds.n_items)
        if self.cfg.run.init_from:
            model.load_export(self.cfg.run.init_from, strict=False)
        return model

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def resume(self) -> bool:
        """Continue from the run folder's latest complete checkpoint, if any (and ``run.resume``)."""
        if not self.cfg.run.resume:
            return False
        tag = self.ckpt.latest()
        if tag is None:
            return False
        self.state = self.ckpt.load(self.engine, tag, world_size=self.world, zero_stage=self.zero_stage,
                                    run_dir=self.run_dir)
        if self.rank == 0 and self.show:
            print(f"resumed from {self.ckpt.dir / tag} (step {self.state.step})", flush=True)
        return True

    def save(self) -> str:
        return self.ckpt.save(self.engine, self.state, world_size=self.world, zero_stage=self.zero_stage,
                              precision=self.cfg.deepspeed.precision,
                              extra={"model_kind": self.cfg.model.kind, "n_items": self.ds.n_items})

    # -- steps ----------------------------------------------------------------------------
    def forward_backward(self, batch) -> tuple[torch.Tensor, dict]:
        """One micro-batch: forward, backward; returns the (detached) loss and the model's metrics."""
        batch = batch.to(self.device, non_blocking=True)
        loss, metrics = self.engine(batch)
        if self.world > 1 and "count" in metrics:
            # DeepSpeed averages gradients over ranks, i.e. the mean of per-rank means; rescale so the
            # gradient is that of the global mean over every valid row (ranks may hold different
            # numbers of rows, e.g. the causal user encoder trained at every position).
            import torch.distributed as dist

            total = metrics["count"].detach().clone()
            dist.all_reduce(total)
            loss = loss * (self.world * metrics["count"].detach() / total.clamp_min(1.0))
        self.engine.backward(loss)
        return loss.detach(), metrics

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks.

        Each rank updates running statistics from its own micro-batches; DeepSpeed saves rank 0's
        and leaves the others to drift, so evaluation (items dealt out to ranks) and export would
        disagree. Done at every optimizer step, in one flat all-reduce, so a resumed run and an
        uninterrupted one stay identical.
        """
        if self.world == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        bufs = [b for b in self.engine.module.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = _flatten_dense_tensors([b.data.float() for b in bufs])
        dist.all_reduce(flat)
        flat /= self.world
        for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
            b.data.copy_(v.to(b.dtype))

    def _lrs(self) -> tuple[float, float]:
        lr = enc = float("nan")
        for g in self.optimizer.param_groups:
            if g.get("name", "").startswith("encoder"):
                enc = g["lr"]
            else:
                lr = g["lr"]
        return lr, enc

    def fit(self, *, steps: int | None = None, save_at_end: bool = True, final_eval: bool = True,
            stop_after: int | None = None) -> TrainResult:
        """Train to ``optim.steps`` (or ``steps``); ``stop_after`` ends early without an end save
        (a stand-in for a killed run in tests)."""
        cfg = self.cfg
        total = steps or cfg.optim.steps
        resumed = self.resume()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1))
        result = TrainResult(self.run_dir, self.state.step)
        start_time = time.time()
        if self.state.step >= total:
            result.metrics = self.final_evaluation() if final_eval else {}
            return result
        bar = progress(total=total, initial=self.state.step, enabled=self.show, desc="train", unit="step")
        loss_sum = torch.zeros((), device=self.device)
        pending: list[tuple[torch.Tensor, int]] = []

        def flush() -> float:
            """Move the pending per-step losses to ``result.losses``; the last one."""
            if pending:
                values = torch.stack([v for v, _ in pending]).tolist()
                result.losses.extend(v / m for v, (_, m) in zip(values, pending))
                pending.clear()
            return result.losses[-1]

        micro_i = 0
        win_seq = win_items = 0
        win_t = time.time()
        done = False
        while not done:
            loader = make_loader(cfg, self.ds, self.content, "train", batch_size=self.micro, rank=self.rank,
                                 world=self.world, start_cursor=self.state.cursor)
            loader.set_epoch(self.state.epoch)
            if len(loader) == 0:
                raise UserError(f"{cfg.data.path}: the training split gives no batch of {self.micro} "
                                f"sequences per rank; lower data.batch_size")
            for batch in loader:
                loss, _ = self.forward_backward(batch)
                for hook in self.after_backward:
                    hook(self, self.state.step)
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.step()
                loss_sum += loss
                micro_i += 1
                win_seq += batch.batch_size
                win_items += batch.num_unique
                self.items_encoded += batch.num_unique
                self.state.cursor = int(batch.cursor)
                if not boundary:
                    continue
                self.sync_buffers()
                self.state.step += 1
                self.state.samples += cfg.data.batch_size
                # the step's loss stays on the device until a log step or the end (one host sync
                # there instead of one per step)
                pending.append((loss_sum.clone(), micro_i))
                loss_sum.zero_()
                micro_i = 0
                bar.update(1)
                step = self.state.step
                for hook in self.after_step:
                    hook(self, step)
                if step % cfg.run.log_every == 0 or step == total:
                    step_loss = flush()
                    dt = max(time.time() - win_t, 1e-9)
                    lr, enc = self._lrs()
                    rec = dict(epoch=self.state.epoch, loss=step_loss, lr=lr,
                               seq_per_s=win_seq * self.world / dt,
                               items_per_s=win_items * self.world / dt)
                    if not math.isnan(enc):
                        rec["lr_encoder"] = enc
                    self.tracker.log("train", step, **rec)
                    bar.set_postfix(loss=f"{step_loss:.3f}")
                    win_seq = win_items = 0
                    win_t = time.time()
                if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                    m = self.evaluate("valid")
                    self.tracker.log("eval", step, split="valid", **m)
                if cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0 and step < total:
                    self.save()
                if stop_after is not None and step >= stop_after:
                    flush()
                    bar.close()
                    result.step = step
                    return result
                if step >= total:
                    done = True
                    break
            else:
                self.state.epoch += 1
                self.state.cursor = 0
        bar.close()
        result.step = self.state.step
        result.seconds = time.time() - start_time
        result.sequences = (self.state.step - (0 if not resumed else 0)) * cfg.data.batch_size
        if save_at_end:
            self.save()
        if final_eval:
            result.metrics = self.final_evaluation()
        return result

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, split: str = "valid", item_emb=None) -> dict:
        cfg = self.cfg
        loader = make_loader(cfg, self.ds, self.content, split, batch_size=cfg.eval.batch_size,
                             rank=self.rank, world=self.world, seed=0)
        loader.set_epoch(0)
        return evaluate(self.engine, loader, self.content, ks=tuple(cfg.eval.ks),
                        item_chunk=cfg.eval.item_chunk, device=self.device, max_users=cfg.eval.max_users,
                        show=self.show, item_emb=item_emb)

    def final_evaluation(self) -> dict:
        from transrec.engine.evaluate import encode_catalogue

        net = self.engine.module
        was = net.training
        net.eval()
        try:
            emb = encode_catalogue(self.engine, self.content, chunk=self.cfg.eval.item_chunk,
                                   device=self.device, show=self.show)
        finally:
            net.train(was)
        out = {}
        for split in ("valid", "test"):
            m = self.evaluate(split, item_emb=emb)
            self.tracker.log("eval", self.state.step, split=split, **m)
            out[split] = m
        if self.rank == 0:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": self.state.step, **out}, indent=1))
        return out

    def close(self) -> None:
        self.tracker.close()
        D.barrier()


def train(cfg: Config, **kw) -> TrainResult:
    """``transrec train``: build, resume if possible, train, save, evaluate."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg)
    try:
        return trainer.fit(**kw)
    finally:
        trainer.close()
