"""The three evaluations of an encoder on labeled splits: kNN, linear probe, fine-tuning.

Each returns an :class:`EvalOutcome`: class scores on the test split (scored once, at the end), the validation
top-1 that guided any choice, and how many labeled images were trained on. Hyperparameters are chosen on the
validation split, which is held out of the training split; the test split never influences a choice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from augment.ops import normalize, padded_crop_flip, sample_crop_flip
from configs.schema import ProbeConfig
from core.device import autocast
from core.errors import UserError
from data import seeded_generator
from evaluation.accuracy import classification_report, topk_accuracy
from evaluation.knn import extract_features_sharded, knn_predict
from evaluation.probe import FeatureFn, feature_stats, select_on_val, train_probes

@dataclass
class LabeledSplits:
    """uint8 images [N, 3, H, W] and int64 labels [N] of each split, on the evaluation device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: Sequence[float]  # normalization of the encoder's inputs
    std: Sequence[float]
    labeled: Optional[torch.Tensor] = None  # distill: bool [N_train], whose labels the run may use; None: all

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class EvalOutcome:
    test_scores: torch.Tensor  # [N_test, C] logits or kNN votes
    val_top1: Optional[float]
    train_images: int  # labeled images the final classifier was trained on
    extra: dict = field(default_factory=dict)  # mode-specific record, e.g. the chosen weight decay
    head: Optional[nn.Linear] = None  # linear and finetune: the trained head on raw encoder features (classifier.pt)


def knn_evaluation(encoder: nn.Module, splits: LabeledSplits, *, k: int, temperature: float, vote: str = "weighted",
                   dtype: torch.dtype) -> EvalOutcome:
    """kNN (weighted or majority vote) with the labeled training images as the bank (the same code as the
    pretraining monitor). With data.val_size=0 the bank is all training images, as in the peers' protocols."""
    features = partial(extract_features_sharded, encoder, mean=splits.mean, std=splits.std, dtype=dtype)
    bank = features(splits.train_images)
    scores = partial(knn_predict, bank, splits.train_labels, num_classes=splits.num_classes, k=k,
                     temperature=temperature, vote=vote)
    val_top1 = topk_accuracy(scores(features(splits.val_images)), splits.val_labels) if len(splits.val_labels) else None
    return EvalOutcome(scores(features(splits.test_images)), val_top1, len(splits.train_labels),
                       {"knn/k": k, "knn/temperature": temperature, "knn/vote": vote})


def check_probe_config(cfg: ProbeConfig, val_size: int) -> None:
    """Fail before any work when the weight-decay grid is empty, negative, or cannot be chosen from."""
    if not cfg.wd_grid or min(cfg.wd_grid) < 0:
        raise UserError(f"probe.wd_grid={list(cfg.wd_grid)} must list one or more weight decays >= 0")
    if len(cfg.wd_grid) > 1 and not val_size:
        raise UserError("probe.wd_grid has several values but there is no validation split to choose among them: "
                        "set data.val_size > 0 or give one value, e.g. probe.wd_grid=[1e-4]")


def linear_evaluation(encoder: nn.Module, splits: LabeledSplits, cfg: ProbeConfig, *, seed: int,
                      dtype: torch.dtype, augment: bool = False, refit_allowed: bool = True,
                      log: Callable[[str], None] = print) -> EvalOutcome:
    """Linear probe on the frozen encoder (eval mode): choose the weight decay on val, score test once.

    Features of train, val and test are extracted once without augmentation. With ``augment`` the classifiers
    see random crop + flip views computed on the fly instead (the val/test features stay clean). With
    ``cfg.refit_on_val`` and ``refit_allowed`` (all labels in use) the chosen classifier is retrained on train +
    val before the test split is scored, as in the SimCLR paper's protocol.
    """
    check_probe_config(cfg, len(splits.val_labels))
    tick = time.perf_counter()
    features = partial(extract_features_sharded, encoder, mean=splits.mean, std=splits.std, dtype=dtype)
    train_f, val_f, test_f = (features(x) for x in (splits.train_images, splits.val_images, splits.test_images))
    log(f"probe: features {tuple(train_f.shape)} train, {tuple(val_f.shape)} val, {tuple(test_f.shape)} test "
        f"in {time.perf_counter() - tick:.1f}s")
    fit = partial(train_probes, num_classes=splits.num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                  lr=cfg.lr, seed=seed)

    def fit_on(image_parts, feats, labels, weight_decays):
        mean, std = feature_stats(feats)  # of clean features, also for augmented views
        if augment:  # images are only needed (and concatenated) for on-the-fly views
            source = _augmented_features(encoder, torch.cat(image_parts), splits, dtype, seed, mean, std)
        else:
            standardized = (feats - mean) / std  # once, not per step
            source = lambda idx, _: standardized[idx]  # noqa: E731
        return fit(source, labels, mean=mean, std=std, weight_decays=weight_decays)

    tick = time.perf_counter()
    chosen = select_on_val(fit_on([splits.train_images], train_f, splits.train_labels, cfg.wd_grid), val_f,
                           splits.val_labels)
    final, trained_on = chosen.probe, len(splits.train_labels)
    if cfg.refit_on_val and refit_allowed and len(splits.val_labels):
        final = fit_on([splits.train_images, splits.val_images], torch.cat([train_f, val_f]),
                       torch.cat([splits.train_labels, splits.val_labels]), [chosen.weight_decay])
        trained_on += len(splits.val_labels)
    seconds = time.perf_counter() - tick
    how = f"chosen on val ({chosen.val_top1_by_wd})" if chosen.val_top1_by_wd else "the only one (no validation split)"
    log(f"probe: weight decay {chosen.weight_decay:g} {how}; {len(cfg.wd_grid)} classifiers + refit trained in "
        f"{seconds:.1f}s")
    extra = {"probe/weight_decay": chosen.weight_decay, "probe/val_top1_by_wd": chosen.val_top1_by_wd,
             "probe/train_seconds": round(seconds, 3), "probe/refit_on_val": trained_on > len(splits.train_labels),
             "probe/augment": augment}
    return EvalOutcome(final.logits(test_f)[0], chosen.val_top1, trained_on, extra, head=final.folded_head())


def _augmented_features(encoder: nn.Module, images: torch.Tensor, splits: LabeledSplits, dtype: torch.dtype,
                        seed: int, mean: torch.Tensor, std: torch.Tensor) -> FeatureFn:
    """Standardized features of random crop (padding 4) + flip views of ``images[idx]``; frozen encoder, eval
    mode."""
    encoder.eval()

    @torch.no_grad()
    def features_of(idx: torch.Tensor, step: int) -> torch.Tensor:
        x = augment_batch(images[idx], splits, seeded_generator(images.device, "probe-augment", seed, step))
        with autocast(x.device, dtype):
            return (encoder(x).float() - mean) / std
    return features_of


def augment_batch(images: torch.Tensor, splits: LabeledSplits, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalized float views after random crop and horizontal flip; the crop pads by an eighth
    of the image (4 pixels at 32, 12 at 96), as the CIFAR protocol does at 32."""
    pad = max(1, round(images.shape[-1] / 8))
    offsets, flip = sample_crop_flip(images.shape[0], pad, generator, images.device)
    x = padded_crop_flip(images, pad, offsets, flip).float().div_(255)
    x = normalize(x, splits.mean, splits.std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def results_record(outcome: EvalOutcome, splits: LabeledSplits, *, mode: str, label_fraction: float,
                   val_within_fraction: bool = False, **provenance) -> dict:
    """What results.json holds: test top-1/top-5, per-class accuracy and confusion matrix, val top-1, how many
    labeled images were trained on and how many selection saw (``selection/val_images``, and whether they came from
    within the labeled fraction or beyond it), the mode, plus ``provenance`` (checkpoint, sha256, git SHA, config)."""
    report = classification_report(outcome.test_scores.cpu(), splits.test_labels.cpu(), splits.classes)
    return {"mode": mode, "label_fraction": label_fraction, "val/top1": outcome.val_top1,
            "selection/val_images": len(splits.val_labels), "selection/within_fraction": val_within_fraction,
            "data/train_images": outcome.train_images, "data/val_images": len(splits.val_labels),
            "data/test_images": len(splits.test_labels), **report, **outcome.extra, **provenance}
