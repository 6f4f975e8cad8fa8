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


def create_encoder(arch: str, width: Optional[int] = None) -> nn.Module:
    """A backbone mapping images [B, 3, 32, 32] to features [B, .feature_dim].

    arch: resnet18 | resnet34 | resnet50 (CIFAR stem) | vit_tiny | vit_small (patch 4).
    width: ResNet base width (default 64); ViTs take none.
    """
    if arch in LAYOUTS:
        return cifar_resnet(arch, 64 if width is None else width)
    if arch in SIZES:
        if width is not None:
            raise ValueError(f"model.width applies to ResNets only, not {arch}")
        return cifar_vit(arch)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


__all__ = ["ARCHS", "SimCLR", "create_encoder", "is_vit", "projection_head"]
