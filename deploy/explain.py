"""What a trained classifier looks at: Grad-CAM for the ResNets, class-token attention for the ViTs, and a PNG grid.

Grad-CAM (Selvaraju et al. 2017) on the last stage (``encoder.layer4``): the gradient of the class score (the trained
head's logit of the predicted class) with respect to that stage's activations A [K, h, w], averaged over positions,
weights the channels: map = ReLU(sum_k alpha_k A_k), upsampled bilinearly to the image. ViT attention: the class
token's attention to the 64 patches in the last block, averaged over heads and renormalized over the patches (the
class token's attention to itself left out), recomputed from that block's input exactly as timm computes it.
Both maps are returned as distributions over pixels (each sums to 1): comparable across images and methods.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import is_vit

METHODS = ("gradcam", "attention")


def method_for(arch: str) -> str:
    """The explanation an architecture supports: gradcam for ResNets, attention for ViTs."""
    return "attention" if is_vit(arch) else "gradcam"


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Grad-CAM of ``model`` (``.encoder.layer4``, then the head) on normalized float images [B, 3, H, W].

    classes: the class [B] whose score is explained; None = the predicted one. Returns (maps [B, H, W], each
    summing to 1 (uniform where the map is all zero), logits [B, C])."""
    stage = model.encoder.layer4
    captured = {}

    def keep(module, args, output):  # a frozen encoder's activations get a graph from here to the score
        captured["a"] = output if output.requires_grad else output.detach().requires_grad_(True)
        return captured["a"]

    handle = stage.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(images.requires_grad_(False))
            chosen = logits.argmax(1) if classes is None else classes
            score = logits.gather(1, chosen[:, None]).sum()  # images are independent: one backward for all
            (grads,) = torch.autograd.grad(score, captured["a"])
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: [B, K, 1, 1]
    cam = F.relu((weights * captured["a"]).sum(1, keepdim=True))  # [B, 1, h, w]
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _as_distribution(cam.detach()), logits.detach()


def cls_attention(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class token's attention to the patches in the last block of ``model.encoder`` (a timm ViT), averaged over
    heads: (maps [B, H, W] upsampled from the patch grid, each summing to 1; logits [B, C])."""
    attention = model.encoder.blocks[-1].attn
    captured = {}
    handle = attention.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        handle.remove()
    with torch.no_grad():
        weights = attention_weights(attention, captured["x"])  # [B, heads, N, N]
    to_patches = weights[:, :, 0, model.encoder.num_prefix_tokens:].mean(1)  # [B, P]
    side = int(round(to_patches.shape[1] ** 0.5))
    grid = to_patches.reshape(-1, 1, side, side)
    maps = F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _as_distribution(maps), logits


def attention_weights(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T x scale) [B, heads, N, N] of a timm ``Attention`` on its input x [B, N, D], as its forward
    computes it (qkv projection, q/k norms) before the fused kernel hides the weights."""
    batch, tokens, _ = x.shape
    qkv = attention.qkv(x).reshape(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
    return ((q * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def explain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], method: str,
            path: Path, title: str) -> dict:
    """Explain ``model`` (uint8 images -> logits, e.g. :class:`deploy.export.Deployable`) on uint8 images
    [B, 3, H, W] with true labels [B]; the grid goes to ``path``. Returns what it showed: predictions, top-1 on these
    images, and how concentrated the maps are (the share of each map in its top quarter of pixels, averaged)."""
    model.eval()
    maps, logits = (grad_cam if method == "gradcam" else cls_attention)(model, images)
    predicted = logits.argmax(1)
    save_explanation_grid(images, maps, predicted.tolist(), labels.tolist(), classes, path, title)
    top_quarter = maps.flatten(1).sort(dim=1, descending=True).values[:, :maps[0].numel() // 4].sum(1)
    return {"method": method, "images": len(images), "predicted": predicted.tolist(), "true": labels.tolist(),
            "top1": 100 * (predicted == labels).float().mean().item(),
            "mass_in_top_quarter": top_quarter.mean().item(), "path": str(path)}


def explain_test_images(model: nn.Module, test_images: torch.Tensor, test_labels: torch.Tensor,
                        classes: Sequence[str], *, arch: str, run_name: str, count: int, path: Path) -> dict:
    """What explain.py and finetune.py eval.explain both do: the architecture's method on the fixed set of ``count``
    test images (:func:`fixed_images`) of uint8 ``test_images`` [N, 3, H, W] / ``test_labels`` [N], the grid at
    ``path``; only the chosen images move to the model's device. Returns :func:`explain`'s record plus the grid's
    ``title``."""
    method, device = method_for(arch), next(model.parameters()).device
    chosen = fixed_images(test_labels.cpu(), count).to(test_labels.device)
    title = f"{method} of {arch} ({run_name}) on {len(chosen)} test images"
    shown = explain(model, test_images[chosen].to(device), test_labels[chosen].to(device), classes, method, path,
                    title)
    return {**shown, "title": title}


def _as_distribution(maps: torch.Tensor) -> torch.Tensor:
    """Each map [H, W] of maps [B, H, W] scaled to sum 1 (all-zero maps become uniform)."""
    flat = maps.flatten(1).clamp_min(0)
    total = flat.sum(1, keepdim=True)
    flat = torch.where(total > 0, flat / total.clamp_min(1e-30), torch.full_like(flat, 1 / flat.shape[1]))
    return flat.view_as(maps)


def fixed_images(labels: torch.Tensor, count: int = 16) -> torch.Tensor:
    """Indices [count] of a fixed, class-balanced set of test images: the first of each class in turn, then the
    second of each, ... (the same images for every run on the same test split)."""
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(int(labels.max()) + 1)]
    chosen, rank = [], 0
    while len(chosen) < count and any(rank < len(ids) for ids in by_class):
        chosen += [ids[rank] for ids in by_class if rank < len(ids)]
        rank += 1
    return torch.tensor(chosen[:count])


def save_explanation_grid(images: torch.Tensor, maps: torch.Tensor, predicted: Sequence[int], true: Sequence[int],
                          classes: Sequence[str], path: Path, title: str, per_row: int = 4) -> None:
    """A PNG of (image, heat map, overlay) triplets with the predicted and true class, written atomically.

    images: uint8 [B, 3, H, W]; maps: [B, H, W] (any scale: each is stretched from its minimum to its maximum, so a
    near-uniform map still shows where it is higher; the title says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(1.3 * 3 * per_row, 1.55 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(len(images)):
        picture = images[i].permute(1, 2, 0).cpu().numpy()
        low, high = maps[i].min(), maps[i].max()
        heat = ((maps[i] - low) / (high - low).clamp_min(1e-30)).detach().cpu().numpy()
        cells = axes[i // per_row, 3 * (i % per_row):3 * (i % per_row) + 3]
        cells[0].imshow(picture, interpolation="nearest")
        cells[1].imshow(heat, cmap="jet", vmin=0, vmax=1)
        cells[2].imshow(picture, interpolation="nearest")
        cells[2].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        mark = "" if predicted[i] == true[i] else " (wrong)"
        cells[0].set_title(f"true {classes[true[i]]}", fontsize=7)
        cells[1].set_title(f"pred {classes[predicted[i]]}{mark}", fontsize=7,
                           color="black" if not mark else "firebrick")
    fig.suptitle(f"{title} (each map stretched from its minimum to its maximum)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
