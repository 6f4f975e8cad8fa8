"""Vision Transformers for 32x32 images via timm (patch 4: 64 tokens + a class token)."""
from __future__ import annotations

from torch import nn

SIZES = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
         "vit_small": dict(embed_dim=384, depth=12, num_heads=6)}


def cifar_vit(arch: str, img_size: int = 32, patch_size: int = 4) -> nn.Module:
    """timm ViT without classifier: images [B, 3, 32, 32] -> class-token features [B, embed_dim]."""
    from timm.models.vision_transformer import VisionTransformer  # timm loads only when a ViT is built

    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0, **SIZES[arch])
    model.feature_dim = model.num_features
    return model
