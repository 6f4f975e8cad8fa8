"""Per-sample image ops on float batches [B, C, H, W] in [0, 1], with per-sample parameters as tensors.

Each op equals the matching ``torchvision.transforms.v2.functional`` kernel on float images given the same
parameters (tests/test_augment.py checks this). Parameters are samplable on any device from a
``torch.Generator``, with the distributions of torchvision's ``RandomResizedCrop`` and ``ColorJitter``; nothing
here loops over samples in Python or reads a value back to the host.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision


def _uniform(n: int, low: float, high: float, g: Optional[torch.Generator], device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def device_vector(values: Sequence[float], device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A small constant vector made on ``device`` by scalar fills. ``torch.tensor(values, device="cuda")`` (and
    ``out[i] = value``) copies from pageable host memory, which makes PyTorch wait for the GPU stream: a host sync
    in every training step. ``fill_`` passes the value as a kernel argument instead."""
    out = torch.empty(len(values), device=device, dtype=dtype)
    for i, value in enumerate(values):
        out[i].fill_(value)
    return out


def sample_crop_boxes(n: int, height: int, width: int, scale: Tuple[float, float] = (0.08, 1.0),
                      ratio: Tuple[float, float] = (3 / 4, 4 / 3), generator: Optional[torch.Generator] = None,
                      device: torch.device | str = "cpu", attempts: int = 10) -> Tensor:
    """Crop boxes (top, left, h, w) as float [n, 4], distributed as ``RandomResizedCrop.get_params``.

    torchvision draws up to 10 (area, log-aspect) pairs and keeps the first that fits, else a centre crop; we
    draw all 10 at once per sample and pick the first valid one with argmax, so no Python loop and no sync.
    """
    area = _uniform(n * attempts, *scale, generator, device).view(n, attempts) * (height * width)
    log_ratio = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, device).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting attempt (0 if none fits)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=generator, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1))  # uniform integer in [0, height - h], like randint
    left = torch.floor(u[:, 1] * (width - w + 1))
    fallback = device_vector(_centre_crop(height, width, ratio), device)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def _centre_crop(height: int, width: int, ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _source_coords(start: Tensor, length: Tensor, out_size: int, in_size: int) -> Tensor:
    """Normalized grid_sample coordinates [n, out_size] resizing the window [start, start+length) to out_size.

    Pixel-centre mapping (align_corners=False) clamped to the window's first and last pixel centres: this is how
    torch's bilinear upsampling treats a cropped image's edges, so neighbours outside the crop never leak in.
    """
    first = start[:, None]
    last = (start + length - 1)[:, None]
    src = first + (length / out_size)[:, None] * (torch.arange(out_size, device=start.device) + 0.5) - 0.5
    src = torch.minimum(torch.maximum(src, first), last)
    return (src + 0.5) * (2.0 / in_size) - 1.0


def resized_crop(images: Tensor, boxes: Tensor, size: Tuple[int, int], flip: Optional[Tensor] = None) -> Tensor:
    """Crop each image to its box, resize to ``size`` (bilinear) and optionally flip it horizontally.

    images: float [n, C, H, W]; boxes: float [n, 4] (top, left, h, w); flip: bool [n] -> [n, C, *size].
    One ``grid_sample`` call. Equal to torchvision's ``resized_crop`` (antialias or not) whenever the output is at
    least as large as the crop, which always holds in SimCLRAugment (crops lie inside the image and the output
    keeps its size). Shrinking a crop would need antialiasing, which this does not do.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(dim=1)
    gy = _source_coords(top, h, size[0], height)  # [n, out_h]
    gx = _source_coords(left, w, size[1], width)  # [n, out_w]
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack([gx[:, None, :].expand(n, *size), gy[:, :, None].expand(n, *size)], dim=-1)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_crop_flip(n: int, padding: int, generator: Optional[torch.Generator] = None,
                     device: torch.device | str = "cpu") -> Tuple[Tensor, Tensor]:
    """Parameters of ``RandomCrop(size, padding) + RandomHorizontalFlip()``: offsets int64 [n, 2] (top, left) in
    the padded image, uniform in [0, 2 * padding], and flip bool [n] with probability 1/2."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    return offsets, torch.rand(n, generator=generator, device=device) < 0.5


def padded_crop_flip(images: Tensor, padding: int, offsets: Tensor, flip: Tensor) -> Tensor:
    """Zero-pad by ``padding``, crop the original size at ``offsets``, flip where ``flip``: the CIFAR supervised
    augmentation. Any dtype (uint8 included): it only moves pixels.

    images: [n, C, H, W]; offsets: int64 [n, 2]; flip: bool [n] -> [n, C, H, W]. One indexed gather per batch.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # [n, h]
    cols = torch.where(flip[:, None], torch.arange(w - 1, -1, -1, device=images.device),
                       torch.arange(w, device=images.device)) + offsets[:, 1:]  # [n, w]
    flat = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]  # [n, h, w] indices into each padded plane
    return padded.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(n, c, h * w)).view(n, c, h, w)


def grayscale(images: Tensor) -> Tensor:
    """Luma [n, 1, H, W] of RGB images [n, 3, H, W].

    A [1, 3] x [3, H*W] matmul per image: on CPUs several times faster than three strided plane multiplies.
    """
    n, _, h, w = images.shape
    weights = device_vector(GRAY_WEIGHTS, images.device, images.dtype).view(1, 1, 3)
    return (weights @ images.reshape(n, 3, h * w)).view(n, 1, h, w)


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def blend(images: Tensor, reference: Tensor, factor: Tensor) -> Tensor:
    """``factor * images + (1 - factor) * reference``, clamped to [0, 1]. factor: [n]."""
    return torch.lerp(reference, images, _per_sample(factor)).clamp_(0, 1)


HUE_OFFSETS = (5.0, 3.0, 1.0)  # hsv -> rgb closed form: channel c = v - (v - min) * ramp((offset_c + 6 h) mod 6)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by factor [n] (in turns, within [-0.5, 0.5]) in HSV space. images: [n, 3, H, W] in [0, 1].

    Same result as torchvision's rgb -> hsv -> rgb round trip (to float rounding), computed per colour plane:
    a hue rotation keeps each pixel's max and min channel, so saturation is never formed.
    """
    r, g, b = images.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = (delta + (delta == 0)).reciprocal_()  # grey pixels (delta 0): any finite value, their hue is unused
    rc, gc, bc = (maxc - r).mul_(inv), (maxc - g).mul_(inv), (maxc - b).mul_(inv)
    # Hue in sextants, [-1, 5): the formula depends on which channel is the max (r first, then g, as torchvision).
    hue6 = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc - bc).add_(2.0), (gc - rc).add_(4.0)))
    shift = 6.0 * factor.view(-1, 1, 1)
    out = torch.empty_like(images)
    for c, offset in enumerate(HUE_OFFSETS):
        k = hue6 + (shift + offset)
        k = k.sub_(torch.floor(k * (1 / 6)), alpha=6.0)  # k mod 6
        ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
        torch.addcmul(maxc, delta, ramp, value=-1.0, out=out[:, c])
    return out


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels at or above ``threshold``."""
    return torch.where(images >= threshold, 1.0 - images, images)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalized 1-D Gaussian kernels [n, kernel_size] for per-sample sigma [n] (torchvision's sampling grid)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with reflect padding and one sigma per sample [n]. images: [n, C, H, W]."""
    n, c, h, w = images.shape
    kernel = gaussian_kernels(sigma.to(images.dtype), kernel_size).repeat_interleave(c, dim=0)  # [n*C, k]
    pad = kernel_size // 2
    x = images.reshape(1, n * c, h, w)  # one group per (sample, channel): a per-sample kernel in one conv call
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel[:, None, None, :], groups=n * c)
    x = torch.nn.functional.conv2d(x, kernel[:, None, :, None], groups=n * c)
    return x.view(n, c, h, w)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel, as one fused multiply-add. images: float [n, C, H, W]."""
    scale = device_vector([1 / s for s in std], images.device, images.dtype).view(1, -1, 1, 1)  # in double, then
    shift = device_vector([-m / s for m, s in zip(mean, std)], images.device, images.dtype).view(1, -1, 1, 1)  # cast
    return torch.addcmul(shift, images, scale)
