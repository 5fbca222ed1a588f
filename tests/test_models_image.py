"""Image encoders: each backbone family's adapter (stem, blocks, head), split at every freeze depth,
gives what the library's own forward of the backbone gives (outputs and gradients), and registers
no module of its own (the state-dict keys are the backbone's)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import ConvNextConfig, ConvNextModel, ViTConfig, ViTModel

from transrec.models import ImageEncoderConfig
from transrec.models.image import (
    ConvNextAdapter,
    EfficientNetAdapter,
    ImageItemEncoder,
    ResNetAdapter,
    ViTAdapter,
)
from transrec.models.pooling import flatten_feature_map
from transrec.shards.batch import ImageContent

SIZE = 32
# one encoder per family, the smallest that can be built offline (the resnet18 and vit-small presets
# are the ResNet and ViT families at other sizes): name -> (adapter class, pooling); "folder-*" are
# saved to a temporary folder and loaded from it (the ViT at another image size than its config's:
# interpolated position embeddings)
FAMILIES = {
    "tiny": (ResNetAdapter, "attn"),
    "efficientnet-lite0": (EfficientNetAdapter, "mean"),
    "folder-convnext": (ConvNextAdapter, "mean"),
    "folder-vit": (ViTAdapter, "cls"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    torch.manual_seed(0)
    # drop_path_rate 0: the library's forward and the encoder's must draw nothing at random
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3,
                                 drop_path_rate=0.0)).save_pretrained(root / "convnext")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=8), add_pooling_layer=False).save_pretrained(root / "vit")
    return root


def _encoder(name: str, folders, trainable) -> ImageItemEncoder:
    path = str(folders / name.split("-", 1)[1]) if name.startswith("folder-") else name
    torch.manual_seed(0)
    return ImageItemEncoder(ImageEncoderConfig(name=path, image_size=SIZE, pooling=FAMILIES[name][1],
                                               trainable=trainable), 8)


def _library_features(enc: ImageItemEncoder, x: torch.Tensor) -> torch.Tensor:
    """The backbone's own forward, as transformers / efficientnet-lite-pytorch define it, pooled and
    projected by the encoder: the reference the adapter's stem/blocks/head walk must equal."""
    bb = enc.backbone
    if enc.arch == "efficientnet":
        return enc.proj(enc.pool(flatten_feature_map(bb.extract_features(x))))
    if enc.arch == "vit":  # last_hidden_state is after the final LayerNorm
        h = bb(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        return enc.proj(enc.pool(h))
    out = bb(pixel_values=x)
    if enc.arch == "convnext":  # pooler_output = LayerNorm(mean over positions)
        assert enc.cfg.pooling == "mean"
        return enc.proj(out.pooler_output)
    return enc.proj(enc.pool(flatten_feature_map(out.last_hidden_state)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_split_equals_the_library_forward(name, folders):
    gen = torch.Generator().manual_seed(1)
    pix = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    for trainable in ("none", 2, "all"):
        enc = _encoder(name, folders, trainable)
        assert type(enc.adapter) is FAMILIES[name][0]
        # the adapter registers no module: every key is the backbone's, the pooling's or the projection's
        assert {k.split(".")[0] for k in enc.state_dict()} <= {"backbone", "pool", "proj"}
        params = [p for p in enc.parameters() if p.requires_grad]
        for mode in ("eval", "train"):
            getattr(enc, mode)()
            torch.manual_seed(3)  # EfficientNet's drop-connect in training draws the same masks
            split = enc.forward_tail(enc.forward_prefix(pix))
            torch.manual_seed(3)
            whole = _library_features(enc, enc.preprocess(pix))
            torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5, msg=f"{name} {trainable} {mode}")
            torch.manual_seed(3)
            torch.testing.assert_close(enc(ImageContent(pix, torch.arange(3))), split, rtol=0, atol=0)
            w = torch.randn_like(split)
            g_split = torch.autograd.grad((split * w).sum(), params)
            g_whole = torch.autograd.grad((whole * w).sum(), params)
            for a, b in zip(g_split, g_whole):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} {trainable} {mode}")
        if trainable == "none":
            assert enc.n_trainable_blocks == 0 and enc.prefix_frozen()


def test_adapter_follows_a_copied_encoder(folders):
    """The prefix cache builds on a deep copy when the encoder lives on another device: the copy's
    adapter must walk the copy's modules, not the original's."""
    enc = _encoder("tiny", folders, 1).eval()
    clone = copy.deepcopy(enc)
    assert clone.adapter.backbone is clone.backbone
    assert all(a is b for a, b in zip(clone.adapter.blocks, clone.backbone.encoder.stages))
    pix = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        for p in clone.backbone.parameters():
            p.mul_(0.5)
        assert not torch.allclose(clone.forward_prefix(pix), enc.forward_prefix(pix))
