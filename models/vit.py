"""Vision Transformers for 32x32 images via timm (patch 4: 64 tokens + a class token)."""
from __future__ import annotations

from functools import lru_cache

from torch import nn

SIZES = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
         "vit_small": dict(embed_dim=384, depth=12, num_heads=6)}


@lru_cache(maxsize=None)
def _vit_class() -> type:
    """timm's VisionTransformer, naming its output width ``feature_dim`` as every encoder here does (a subclass,
    not an attribute patched onto an instance; state-dict keys stay timm's). Built on first use: timm loads only
    when a ViT is built."""
    from timm.models.vision_transformer import VisionTransformer

    class CifarViT(VisionTransformer):
        @property
        def feature_dim(self) -> int:
            return self.num_features

    return CifarViT


def cifar_vit(arch: str, img_size: int = 32, patch_size: int = 4) -> nn.Module:
    """timm ViT without classifier: images [B, 3, 32, 32] -> class-token features [B, .feature_dim]."""
    return _vit_class()(img_size=img_size, patch_size=patch_size, num_classes=0, **SIZES[arch])
