"""The SimCLR two-view augmentation, batched: every sample draws its own parameters, no Python loop over samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from augment import ops

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class JitterParams:
    """Per-sample colour-jitter parameters; identity values (factor 1, hue 0) where jitter is not applied."""

    brightness: Tensor  # [n] in [max(0, 1 - 0.8 s), 1 + 0.8 s]
    contrast: Tensor  # [n], same range
    saturation: Tensor  # [n], same range
    hue: Tensor  # [n] in [-0.2 s, 0.2 s]
    blend_order: Tensor  # int64 [n, 3]: a random order of (0 brightness, 1 contrast, 2 saturation)
    hue_position: Tensor  # int64 [n] in 0..3: how many blend ops run before hue
    applied: Tensor  # bool [n]


class SimCLRAugment:
    """Two augmented views of uint8 images [B, 3, H, W] (any device), normalized float32 [B, 3, H, W] each.

    Per view: random resized crop (scale (min_scale, 1), ratio (3/4, 4/3)) and horizontal flip in one resampling;
    colour jitter (brightness, contrast, saturation 0.8 s, hue 0.2 s, s = strength) with probability jitter_prob in
    a random order per sample; grayscale with gray_prob; optional Gaussian blur (sigma in (0.1, 2), kernel 10% of
    the side) and solarization; normalization. No arguments: the CIFAR-10 recipe (s = 0.5, no blur).
    """

    def __init__(self, strength: float = 0.5, min_scale: float = 0.08, jitter_prob: float = 0.8,
                 gray_prob: float = 0.2, blur_prob: float = 0.0, solarize_prob: float = 0.0,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        if not 0 <= 0.2 * strength <= 0.5:
            raise ValueError(f"strength={strength}: the hue range 0.2 x strength must lie in [0, 0.5]")
        self.strength, self.min_scale = strength, min_scale
        self.jitter_prob, self.gray_prob = jitter_prob, gray_prob
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """uint8 [B, 3, H, W] -> two float32 [B, 3, H, W] views, normalized."""
        x = images.float().div_(255).repeat(2, 1, 1, 1)  # both views in one batch of 2B: fewer, larger kernels
        views = self.augment(x, generator)
        return views.chunk(2)

    def augment(self, x: Tensor, g: Optional[torch.Generator] = None) -> Tensor:
        """One random view of each float image in [0, 1], [n, 3, H, W] -> normalized [n, 3, H, W]."""
        n, _, height, width = x.shape
        boxes = ops.sample_crop_boxes(n, height, width, scale=(self.min_scale, 1.0), generator=g, device=x.device)
        x = ops.resized_crop(x, boxes, (height, width), flip=self._coin(n, 0.5, g, x.device))
        x = apply_jitter(x, sample_jitter(n, self.strength, self.jitter_prob, g, x.device))
        x = _select(self._coin(n, self.gray_prob, g, x.device), ops.grayscale(x), x)
        if self.blur_prob > 0:
            sigma = torch.rand(n, generator=g, device=x.device) * 1.9 + 0.1
            blurred = ops.gaussian_blur(x, sigma, kernel_size=_odd(0.1 * height))
            x = _select(self._coin(n, self.blur_prob, g, x.device), blurred, x)
        if self.solarize_prob > 0:
            x = _select(self._coin(n, self.solarize_prob, g, x.device), ops.solarize(x), x)
        return ops.normalize(x, self.mean, self.std)

    @staticmethod
    def _coin(n: int, p: float, g: Optional[torch.Generator], device) -> Tensor:
        return torch.rand(n, generator=g, device=device) < p


def _select(mask: Tensor, chosen: Tensor, other: Tensor) -> Tensor:
    """Per-sample choice: ``chosen`` where mask [n] is true, else ``other``. lerp with weight 0 or 1 is exact and,
    unlike ``torch.where`` with a broadcast mask, vectorizes well on CPUs."""
    return torch.lerp(other, chosen, mask.to(other.dtype).view(-1, 1, 1, 1))


def _odd(value: float) -> int:
    k = max(3, int(value))
    return k if k % 2 else k + 1


def sample_jitter(n: int, strength: float, prob: float, g: Optional[torch.Generator] = None,
                  device: torch.device | str = "cpu") -> JitterParams:
    """Draw ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) parameters, applied with probability ``prob``, for n samples.

    A uniformly random order of the four ops is drawn as a random order of the three blend ops plus an independent
    uniform position for hue: 3! x 4 = 24 equally likely orders, the same distribution as ``torch.randperm(4)``.
    """
    b, h = 0.8 * strength, 0.2 * strength
    factors = torch.rand(n, 3, generator=g, device=device) * (2 * b) + (1 - b)
    factors = factors.clamp(min=0)  # torchvision's range starts at max(0, 1 - b); equal in law after clamping only
    hue = torch.rand(n, generator=g, device=device) * (2 * h) - h
    blend_order = torch.rand(n, 3, generator=g, device=device).argsort(dim=1)
    hue_position = torch.randint(0, 4, (n,), generator=g, device=device)
    applied = torch.rand(n, generator=g, device=device) < prob
    factors = torch.where(applied[:, None], factors, torch.ones_like(factors))
    hue = torch.where(applied, hue, torch.zeros_like(hue))
    return JitterParams(*factors.unbind(dim=1), hue, blend_order, hue_position, applied)


def apply_jitter(x: Tensor, p: JitterParams) -> Tensor:
    """Apply sampled jitter: blend ops before hue, hue once, blend ops after hue. x: [n, 3, H, W] in [0, 1].

    Hue is the costly op, so it runs once for the whole batch. A blend step a sample skips gets factor 1, which is
    an exact identity (x * 1 + ref * 0, clamped to [0, 1]), so skipping needs no masking.
    """
    factors = torch.stack([p.brightness, p.contrast, p.saturation], dim=1)  # [n, 3]
    ones = torch.ones_like(p.brightness)
    for before_hue in (True, False):
        for step in range(3):
            op = p.blend_order[:, step]
            runs_now = (step < p.hue_position) if before_hue else (step >= p.hue_position)
            factor = torch.where(runs_now, factors.gather(1, op[:, None]).squeeze(1), ones)
            x = _blend_step(x, op, factor)
        if before_hue:
            x = _select(p.applied, ops.adjust_hue(x, p.hue), x)
    return x


def _blend_step(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """One of brightness (op 0), contrast (1) or saturation (2) per sample, as a blend with its reference image."""
    gray = ops.grayscale(x)
    is_contrast, is_saturation = ((op == k).to(x.dtype).view(-1, 1, 1, 1) for k in (1, 2))
    # Reference image: black (brightness), mean luma (contrast) or the luma image (saturation).
    reference = torch.addcmul(gray * is_saturation, gray.mean(dim=(-2, -1), keepdim=True), is_contrast)
    return ops.blend(x, reference, factor)
