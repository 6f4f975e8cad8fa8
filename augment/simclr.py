"""The SimCLR two-view augmentation, batched: every sample draws its own parameters, no Python loop over samples."""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from augment import ops

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The encoder's input normalization by name (config aug.normalize): (mean, std) per RGB channel of pixels in [0, 1].
NORMALIZATIONS = {"cifar": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


@torch.no_grad()
def image_statistics(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 images [N, 3, H, W] scaled to [0, 1]. The sums are taken in int64, so they
    are exact and the same however the work is split (thread counts, processes, devices)."""
    total = torch.zeros(3, dtype=torch.int64, device=images.device)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].long()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / 3
    mean = [t / count / 255 for t in total.tolist()]
    std = [max(q / count / 255 ** 2 - m * m, 1e-12) ** 0.5 for q, m in zip(squares.tolist(), mean)]
    return tuple(mean), tuple(std)


def normalization(name: str, images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of aug.normalize ``name``: ``auto`` measures ``images`` (uint8 [N, 3, H, W]), the others are
    fixed constants (:data:`NORMALIZATIONS`)."""
    return image_statistics(images) if name == "auto" else NORMALIZATIONS[name]


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


@dataclass
class ViewParams:
    """Every random choice behind n augmented views."""

    boxes: Optional[Tensor]  # float [n, 4]: crop (top, left, h, w); None without the crop (the whole image)
    flip: Tensor  # bool [n]
    jitter: JitterParams
    gray: Tensor  # bool [n]
    sigma: Optional[Tensor]  # [n] blur sigma; None when blur is off
    blur: Optional[Tensor]  # bool [n]
    solarize: Optional[Tensor]  # bool [n]

    def take(self, index: Tensor) -> "ViewParams":
        """The parameters of views ``index`` (int64 [m])."""
        return _map_tensors(self, lambda value: value[index])

    def to(self, device: torch.device | str) -> "ViewParams":
        return _map_tensors(self, lambda value: value.to(device))


def _map_tensors(params, fn):
    values = {}
    for f in fields(params):
        value = getattr(params, f.name)
        values[f.name] = fn(value) if isinstance(value, Tensor) else (
            _map_tensors(value, fn) if is_dataclass(value) else value)
    return type(params)(**values)


class SimCLRAugment:
    """Two augmented views of uint8 images [B, 3, H, W] (any device), normalized float32 [B, 3, H, W] each.

    Per view: random resized crop (scale (min_scale, 1), ratio (3/4, 4/3); ``crop=False``: the whole image) and
    horizontal flip in one resampling;
    colour jitter (brightness, contrast, saturation 0.8 s, hue 0.2 s, s = strength) with probability jitter_prob in
    a random order per sample; grayscale with gray_prob; optional Gaussian blur (sigma in (0.1, 2), kernel 10% of
    the side) and solarization; normalization. No arguments: the CIFAR-10 recipe (s = 0.5, no blur).

    Multi-crop (``local_crops`` K > 0): :meth:`local` makes K more views per image, crops of area ``local_scale``
    resized to ``local_size`` pixels, with the same colour pipeline. Shrinking a crop is bilinear without
    antialiasing: at most 1.25x at the CIFAR default (a 20-pixel side, 0.4 of 32x32, to 16).
    """

    def __init__(self, strength: float = 0.5, min_scale: float = 0.08, jitter_prob: float = 0.8,
                 gray_prob: float = 0.2, blur_prob: float = 0.0, solarize_prob: float = 0.0,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, crop: bool = True,
                 local_crops: int = 0, local_size: int = 16, local_scale: Tuple[float, float] = (0.05, 0.4)) -> None:
        if not 0 <= 0.2 * strength <= 0.5:
            raise ValueError(f"strength={strength}: the hue range 0.2 x strength must lie in [0, 0.5]")
        if local_crops and not (crop and local_size > 0 and 0 < local_scale[0] <= local_scale[1] <= 1):
            raise ValueError(f"local crops need the crop, a size > 0 and 0 < min scale <= max scale <= 1; got "
                             f"crop={crop}, size {local_size}, scale {tuple(local_scale)}")
        self.strength, self.min_scale, self.crop = strength, min_scale, crop
        self.local_crops, self.local_size, self.local_scale = local_crops, local_size, tuple(local_scale)
        self.jitter_prob, self.gray_prob = jitter_prob, gray_prob
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None,
                 shard: Tuple[int, int] = (0, 1)) -> Tuple[Tensor, Tensor]:
        """uint8 [B, 3, H, W] -> two float32 [B, 3, H, W] views, normalized.

        shard=(rank, world): ``images`` are this rank's B images of a global batch of world x B. Parameters are
        drawn for the whole global batch (cheap: a few numbers per image) and each rank keeps its own rows, so N
        processes produce exactly the views one process makes of the whole batch with the same generator.
        """
        views = self._views(images, 2, generator, shard, (self.min_scale, 1.0), None)
        return views.chunk(2)

    def local(self, images: Tensor, generator: Optional[torch.Generator] = None,
              shard: Tuple[int, int] = (0, 1)) -> Tensor:
        """uint8 [B, 3, H, W] -> the K small views, float32 [K B, 3, local_size, local_size] normalized, crop k of
        every image in turn (crop-major). Drawn after :meth:`__call__`'s from the same generator; sharded alike."""
        return self._views(images, self.local_crops, generator, shard, self.local_scale,
                           (self.local_size, self.local_size))

    def _views(self, images: Tensor, count: int, generator: Optional[torch.Generator], shard: Tuple[int, int],
               scale: Tuple[float, float], size: Optional[Tuple[int, int]]) -> Tensor:
        """``count`` views of every image, [count B, 3, *size], view-major. Parameters are drawn for the global batch
        of world x B images in the layout [view 1 of all; view 2 of all; ...] and each rank keeps its rows."""
        rank, world = shard
        b = images.shape[0]
        x = images.float().div_(255).repeat(count, 1, 1, 1)  # all views in one batch: fewer, larger kernels
        params = self.sample(count * b * world, *x.shape[-2:], generator, x.device, scale=scale)
        if world > 1:
            own = torch.arange(b, device=x.device) + rank * b
            params = params.take(torch.cat([own + k * b * world for k in range(count)]))
        return self.apply(x, params, size)

    def compile(self) -> "SimCLRAugment":
        """Fuse :meth:`apply` with torch.compile (meant for CUDA): its ~80 small elementwise kernels per batch
        become a few. Sampling stays eager: it reads generators, which compiled graphs do not take."""
        self.apply = torch.compile(self.apply, dynamic=False)
        return self

    def sample(self, n: int, height: int, width: int, g: Optional[torch.Generator] = None,
               device: torch.device | str = "cpu", scale: Optional[Tuple[float, float]] = None) -> "ViewParams":
        """Every random choice for n views, drawn from ``g`` in a fixed order; ``scale``: the crop's area range
        (default (min_scale, 1))."""
        boxes = ops.sample_crop_boxes(n, height, width, scale=scale or (self.min_scale, 1.0), generator=g,
                                      device=device) if self.crop else None
        flip = self._coin(n, 0.5, g, device)
        jitter = sample_jitter(n, self.strength, self.jitter_prob, g, device)
        gray = self._coin(n, self.gray_prob, g, device)
        sigma = blur = solarize = None
        if self.blur_prob > 0:
            sigma = torch.rand(n, generator=g, device=device) * 1.9 + 0.1
            blur = self._coin(n, self.blur_prob, g, device)
        if self.solarize_prob > 0:
            solarize = self._coin(n, self.solarize_prob, g, device)
        return ViewParams(boxes, flip, jitter, gray, sigma, blur, solarize)

    def apply(self, x: Tensor, p: "ViewParams", size: Optional[Tuple[int, int]] = None) -> Tensor:
        """Views of float images in [0, 1], [n, 3, H, W], with sampled parameters -> normalized [n, 3, *size]
        (size: default (H, W))."""
        height, width = size or x.shape[-2:]
        if p.boxes is not None:
            x = ops.resized_crop(x, p.boxes, (height, width), flip=p.flip)
        else:  # no crop: the flip alone, exactly (resampling the whole image would blur it a little)
            x = _select(p.flip, x.flip(-1), x)
        x = apply_jitter(x, p.jitter)
        x = _select(p.gray, ops.grayscale(x), x)
        if p.blur is not None:
            x = _select(p.blur, ops.gaussian_blur(x, p.sigma, kernel_size=_odd(0.1 * height)), x)
        if p.solarize is not None:
            x = _select(p.solarize, ops.solarize(x), x)
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
    low = max(0.0, 1 - b)  # torchvision's range [max(0, 1 - b), 1 + b]: above b = 1 a clamp would pile mass on 0
    factors = torch.rand(n, 3, generator=g, device=device) * (1 + b - low) + low
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
