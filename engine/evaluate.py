"""The three evaluations of an encoder on labeled splits: kNN, linear probe, fine-tuning.

Each returns an :class:`EvalOutcome`: class scores on the test split (scored once, at the end), the validation
top-1 that guided any choice, and how many labeled images were trained on. Hyperparameters are chosen on the
validation split, which is held out of the training split; the test split never influences a choice.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from augment.ops import normalize, padded_crop_flip, sample_crop_flip
from configs.schema import OptimConfig, ProbeConfig, TrainConfig
from data import EpochSampler, seeded_generator
from engine.accuracy import classification_report, topk_accuracy
from core.files import atomic_save
from core.errors import Stopped, UserError
from core.device import autocast
from core import dist
from engine.knn import extract_features_sharded, knn_predict
from engine.optim import effective_lr, optimizer_and_schedule, set_lr
from engine.preemption import StopRequest
from engine.probe import FeatureFn, feature_stats, select_on_val, train_probes
from engine.tracking import MetricsLog, format_metrics


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class EvalOutcome:
    test_scores: torch.Tensor  # [N_test, C] logits or kNN votes
    val_top1: Optional[float]
    train_images: int  # labeled images the final classifier was trained on
    extra: dict = field(default_factory=dict)  # mode-specific record, e.g. the chosen weight decay


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
    log(f"probe: weight decay {chosen.weight_decay:g} chosen on val ({chosen.val_top1_by_wd}); "
        f"{len(cfg.wd_grid)} classifiers + refit trained in {seconds:.1f}s")
    extra = {"probe/weight_decay": chosen.weight_decay, "probe/val_top1_by_wd": chosen.val_top1_by_wd,
             "probe/train_seconds": round(seconds, 3), "probe/refit_on_val": trained_on > len(splits.train_labels),
             "probe/augment": augment}
    return EvalOutcome(final.logits(test_f)[0], chosen.val_top1, trained_on, extra)


def _augmented_features(encoder: nn.Module, images: torch.Tensor, splits: LabeledSplits, dtype: torch.dtype,
                        seed: int, mean: torch.Tensor, std: torch.Tensor) -> FeatureFn:
    """Standardized features of random crop (padding 4) + flip views of ``images[idx]``; frozen encoder, eval
    mode."""
    encoder.eval()

    @torch.no_grad()
    def features_of(idx: torch.Tensor, step: int) -> torch.Tensor:
        x = _augment_batch(images[idx], splits, seeded_generator(images.device, "probe-augment", seed, step))
        with autocast(x.device, dtype):
            return (encoder(x).float() - mean) / std
    return features_of


def _augment_batch(images: torch.Tensor, splits: LabeledSplits, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalized float views after random crop (padding 4) and horizontal flip."""
    offsets, flip = sample_crop_flip(images.shape[0], 4, generator, images.device)
    x = padded_crop_flip(images, 4, offsets, flip).float().div_(255)
    x = normalize(x, splits.mean, splits.std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


class Classifier(nn.Module):
    """Encoder + a new linear head: images [B, 3, H, W] -> logits [B, C]."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@dataclass
class FinetuneState:
    """Where fine-tuning checkpoints go and what they carry, and how to stop: a run that is killed, preempted or
    requeued continues from its last checkpoint with the same command and ends with the same numbers."""

    path: Optional[Path] = None  # checkpoints/last.pt of the evaluation run; None: no checkpoints
    every: int = 1  # epochs between checkpoints (also written at the end and on a stop signal)
    provenance: dict = field(default_factory=dict)  # saved beside the weights (config, encoder SHA-256) and checked
    resume: Optional[dict] = None  # a checkpoint read back: continue from it
    stop: Optional[StopRequest] = None  # polled between steps


def finetune_evaluation(encoder: nn.Module, splits: LabeledSplits, train: TrainConfig, optim: OptimConfig, *,
                        seed: int, dtype: torch.dtype, val_every: int, metrics: MetricsLog,
                        state: Optional[FinetuneState] = None) -> EvalOutcome:
    """Fine-tune the whole network plus a new head on the labeled training images; score test at the end.

    SGD (Nesterov by default) with warm-up + cosine per step, random crop (padding 4) + flip on the device. The
    step's augmentation and the epoch's order derive from (seed, step) and (seed, epoch), so resuming is exact.
    """
    state = state or FinetuneState()
    device = splits.train_labels.device
    try:
        sampler = EpochSampler(len(splits.train_labels), train.batch_size, seed, dist.rank(), dist.world_size())
    except ValueError as err:
        raise UserError(f"train.batch_size={train.batch_size}: {err}; lower train.batch_size") from None
    model = Classifier(encoder, splits.num_classes).to(device)
    optimizer, schedule = optimizer_and_schedule(optim, model, batch_size=train.batch_size, epochs=train.epochs,
                                                 steps_per_epoch=sampler.steps_per_epoch)
    step_model = dist.wrap_ddp(model, device)  # gradients averaged over ranks under torchrun
    step_model = torch.compile(step_model) if train.compile else step_model
    predict = partial(extract_features_sharded, model, mean=splits.mean, std=splits.std, dtype=dtype)  # [N, C]
    val_top1, step, start_epoch, stop_agreed = None, 0, 0, False
    if state.resume is not None:
        model.load_state_dict(state.resume["model"])
        optimizer.load_state_dict(state.resume["optimizer"])
        step, start_epoch, val_top1 = state.resume["step"], state.resume["epoch"], state.resume.get("val_top1")
    save = partial(_save_finetune_state, state, model, optimizer)
    for epoch in range(start_epoch, train.epochs):
        model.train()
        loss_sum, seen, tick = torch.zeros((), device=device), 0, time.perf_counter()
        for idx in sampler.batches(epoch, device, start=step - epoch * sampler.steps_per_epoch):
            if stop_agreed or (state.stop is not None and state.stop.requested and dist.world_size() == 1):
                save(step, epoch, val_top1)
                raise _stopped(state, step)
            g = seeded_generator(device, "finetune", seed, step, dist.rank())
            x = _augment_batch(splits.train_images[idx], splits, g)
            with autocast(device, dtype):
                loss = F.cross_entropy(step_model(x).float(), splits.train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = schedule(step)
            set_lr(optimizer, lr)
            optimizer.step()
            loss_sum += loss.detach()
            step, seen = step + 1, seen + 1
            if step % train.log_every == 0 or step % sampler.steps_per_epoch == 0:  # the only host syncs
                stop_agreed = _log_steps(metrics, step, step / sampler.steps_per_epoch, loss_sum, seen, lr, state, {
                    "train/base_lr": optim.base_lr,
                    "train/images_per_s": seen * train.batch_size / (time.perf_counter() - tick)})
                seen, tick = 0, time.perf_counter()
        done = epoch + 1
        if len(splits.val_labels) and ((val_every and done % val_every == 0) or done == train.epochs):
            val_top1 = topk_accuracy(predict(splits.val_images), splits.val_labels)
            record = metrics.log(step, done, {"val/top1": val_top1})
            if dist.is_main():
                print(format_metrics(record), flush=True)
        if done % state.every == 0 or done == train.epochs:
            save(step, done, val_top1)
    return EvalOutcome(predict(splits.test_images), val_top1, len(splits.train_labels),
                       {"finetune/steps": step, "finetune/peak_lr": effective_lr(optim.base_lr, train.batch_size)})


def _log_steps(metrics: MetricsLog, step: int, epoch: float, loss_sum: torch.Tensor, steps: int, lr: float,
               state: FinetuneState, extra: dict) -> bool:
    """Read the summed loss of the last ``steps`` steps (one host sync, zeroing the sum), log and print it; returns
    whether any rank was asked to stop (ranks signalled at different steps stop at the same one)."""
    wants_stop = float(state.stop is not None and state.stop.requested)
    loss, stops = dist.all_reduce_mean(torch.stack([loss_sum, torch.full_like(loss_sum, wants_stop)])).tolist()
    loss_sum.zero_()
    record = metrics.log(step, epoch, {"train/loss": loss / steps, "train/lr": lr, **extra})
    if dist.is_main():
        print(format_metrics(record), flush=True)
    return stops > 0


def _stopped(state: FinetuneState, step: int) -> Stopped:
    return Stopped(f"{state.stop.name or 'a stop signal on another rank'} at step {step}; checkpoint {state.path} "
                   "written; the same command continues from there", 128 + (state.stop.signum or signal.SIGTERM))


def _save_finetune_state(state: FinetuneState, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                         epoch: int, val_top1: Optional[float]) -> None:
    """Atomically, by rank 0: weights, optimizer, step, completed epochs, last validation top-1, provenance."""
    if state.path is not None and dist.is_main():
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                     "val_top1": val_top1, **state.provenance}, state.path)
    dist.barrier()


def results_record(outcome: EvalOutcome, splits: LabeledSplits, *, mode: str, label_fraction: float,
                   **provenance) -> dict:
    """What results.json holds: test top-1/top-5, per-class accuracy and confusion matrix, val top-1, how many
    labeled images were trained on, the mode, plus ``provenance`` (checkpoint and its sha256, git SHA, config)."""
    report = classification_report(outcome.test_scores.cpu(), splits.test_labels.cpu(), splits.classes)
    return {"mode": mode, "label_fraction": label_fraction, "val/top1": outcome.val_top1,
            "data/train_images": outcome.train_images, "data/val_images": len(splits.val_labels),
            "data/test_images": len(splits.test_labels), **report, **outcome.extra, **provenance}
