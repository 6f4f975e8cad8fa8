"""Batched GPU-friendly augmentation: the SimCLR two-view pipeline and its per-sample ops."""
from augment.simclr import CIFAR10_MEAN, CIFAR10_STD, NORMALIZATIONS, SimCLRAugment, image_statistics, normalization

__all__ = ["SimCLRAugment", "CIFAR10_MEAN", "CIFAR10_STD", "NORMALIZATIONS", "image_statistics", "normalization"]
