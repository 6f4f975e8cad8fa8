"""Datasets as device-resident uint8 tensors: sources, deterministic splits and the epoch sampler."""
from data.sampler import EpochSampler, derived_seed, seeded_generator
from data.sources import ImageDataset, load_source, make_synthetic, resize_images, resized
from data.splits import balanced_subset, class_ranks, split_labeled, split_train_val

__all__ = ["EpochSampler", "ImageDataset", "balanced_subset", "class_ranks", "derived_seed", "load_source",
           "make_synthetic", "resize_images", "resized", "seeded_generator", "split_labeled", "split_train_val"]
