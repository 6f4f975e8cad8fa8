"""Encoders, heads and the SimCLR module. ``create_encoder`` is the one way to build a backbone."""
from __future__ import annotations

from typing import Optional

from torch import nn

from core.names import ARCHS

from models.heads import projection_head
from models.resnet import LAYOUTS, cifar_resnet
from models.simclr import SimCLR
from models.vit import SIZES, cifar_vit


def is_vit(arch: str) -> bool:
    """Whether ``arch`` names a ViT (timm; class-token attention, no batch norm) rather than a ResNet."""
    return arch in SIZES


STEMS = ("auto", "cifar", "imagenet")


def resnet_stem(image_size: int, stem: str = "auto") -> str:
    """``auto``: the CIFAR stem below 96 pixels, the ImageNet stem (7x7 stride 2 + max-pool) from 96 on."""
    return stem if stem != "auto" else ("imagenet" if image_size >= 96 else "cifar")


def create_encoder(arch: str, width: Optional[int] = None, image_size: int = 32, stem: str = "auto") -> nn.Module:
    """A backbone mapping images [B, 3, S, S] (S = ``image_size``) to features [B, .feature_dim].

    arch: resnet18 | resnet34 | resnet50 | vit_tiny | vit_small. width: ResNet base width (default 64); ViTs take
    none. stem: the ResNets' (:func:`resnet_stem`). ViTs are built for ``image_size`` (patch 4 up to 48 pixels, 8
    above). An impossible combination is a ValueError.
    """
    if arch in LAYOUTS:
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        return cifar_resnet(arch, 64 if width is None else width, resnet_stem(image_size, stem))
    if arch in SIZES:
        if width is not None:
            raise ValueError(f"model.width applies to ResNets only, not {arch}")
        if stem not in ("auto", "cifar"):
            raise ValueError(f"model.stem applies to ResNets only, not {arch}")
        return cifar_vit(arch, image_size)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


__all__ = ["ARCHS", "SimCLR", "create_encoder", "is_vit", "projection_head", "resnet_stem"]
