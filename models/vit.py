"""Vision Transformers via timm, for the images' size: patch 4 up to 48 pixels (64 tokens at 32x32), patch 8 above
(64 tokens at 64x64, 144 at 96x96), plus a class token."""
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


def patch_size_for(image_size: int) -> int:
    """4 up to 48 pixels, 8 above: the token count stays between 36 and a few hundred for 24-160 pixel images."""
    return 4 if image_size <= 48 else 8


def cifar_vit(arch: str, img_size: int = 32, patch_size: int = 0) -> nn.Module:
    """timm ViT without classifier: images [B, 3, S, S] -> class-token features [B, .feature_dim]; the patch size is
    :func:`patch_size_for` S unless given, and must divide S. Other sizes (multi-crop's small views) take the
    position embedding interpolated to their patch grid (timm's dynamic_img_size; the same outputs at S)."""
    patch_size = patch_size or patch_size_for(img_size)
    if img_size % patch_size:
        raise ValueError(f"{arch} takes images whose size divides into {patch_size}-pixel patches, not {img_size}")
    return _vit_class()(img_size=img_size, patch_size=patch_size, num_classes=0, dynamic_img_size=True,
                        **SIZES[arch])
