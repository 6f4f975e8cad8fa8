"""Fine-tuning: the whole encoder (and the head layers of eval.features=headK) plus a new linear head on the labeled
training images (eval.mode=finetune; from checkpoint=none with all labels it is the supervised baseline), with the
toolkit of evaluation.finetune_tools. Distillation (evaluation.distillation) runs the same loop on other targets.

SGD (Nesterov by default) or AdamW (layer-wise lr decay for ViTs) with warm-up + cosine per step, random crop
(padding 4) + flip on the device, optional MixUp/CutMix, label smoothing, gradient clipping and an EMA of the weights
scored beside the raw ones. The step's augmentation and mixing and the epoch's order derive from (seed, step) and
(seed, epoch), so resuming is exact. The validation split is measured every eval.val_every epochs; the test split
once, at the end.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from configs.schema import FinetuneOptimConfig, FinetuneTrainConfig
from core import dist
from core.device import autocast
from core.errors import Stopped, UserError
from core.files import atomic_save
from data import EpochSampler, seeded_generator
from evaluation.accuracy import topk_accuracy
from evaluation.evaluate import EvalOutcome, LabeledSplits, augment_batch
from evaluation.finetune_tools import BatchMixer, classification_loss, clip_gradients, weight_average
from evaluation.knn import extract_features_sharded
from optim.optimizers import effective_lr, optimizer_and_schedule, set_lr
from rundir.preemption import StopRequest
from rundir.tracking import MetricsLog, format_metrics


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


@dataclass
class Progress:
    """Where the loop stands: the step, completed epochs and the last validation top-1 of the raw and EMA weights."""

    step: int = 0
    epoch: int = 0
    val: dict = field(default_factory=dict)  # {"val/top1": ..., "ema/val_top1": ...}


def finetune_evaluation(encoder: nn.Module, splits: LabeledSplits, train: FinetuneTrainConfig,
                        optim: FinetuneOptimConfig, *, seed: int, dtype: torch.dtype, val_every: int,
                        metrics: MetricsLog, state: Optional[FinetuneState] = None,
                        targets_fn: Optional[Callable] = None, loss_fn: Optional[Callable] = None) -> EvalOutcome:
    """Fine-tune ``encoder`` (in place) plus a new head; the outcome's test scores are the raw weights' logits
    [N_test, C], its ``head`` the trained head, its extra the EMA's top-1 on val and test when train.ema_decay > 0.

    ``targets_fn(views [B, 3, H, W], indices [B]) -> targets`` and ``loss_fn(logits, targets) -> loss`` replace the
    labels (after MixUp/CutMix) and the cross-entropy: distillation's teacher predictions and loss."""
    state, device = state or FinetuneState(), splits.train_labels.device
    try:
        sampler = EpochSampler(len(splits.train_labels), train.batch_size, seed, dist.rank(), dist.world_size())
    except ValueError as err:
        raise UserError(f"train.batch_size={train.batch_size}: {err}; lower train.batch_size") from None
    model = Classifier(encoder, splits.num_classes).to(device)
    optimizer, schedule = optimizer_and_schedule(optim, model, batch_size=train.batch_size, epochs=train.epochs,
                                                 steps_per_epoch=sampler.steps_per_epoch,
                                                 restarts=train.schedule_restarts)
    step_model = dist.wrap_ddp(model, device)  # gradients averaged over ranks under torchrun
    step_model = torch.compile(step_model) if train.compile else step_model
    ema = weight_average(model, train.ema_decay)
    mixer = BatchMixer(splits.num_classes, mixup_alpha=train.mixup_alpha, cutmix_alpha=train.cutmix_alpha,
                       mix_prob=train.mix_prob, switch_prob=train.cutmix_switch_prob, seed=seed)
    at = _restore(state.resume, model, optimizer, ema)
    save = partial(_save_finetune_state, state, model, optimizer, ema)
    predict = partial(_predict, splits=splits, dtype=dtype)
    loss_fn = loss_fn or partial(classification_loss, label_smoothing=train.label_smoothing)
    step_fn = partial(finetune_step, step_model, optimizer, loss_fn=loss_fn, grad_clip=train.grad_clip, dtype=dtype)
    stop_agreed = False
    for epoch in range(at.epoch, train.epochs):
        model.train()
        sums, seen, tick = torch.zeros(2, device=device), 0, time.perf_counter()  # sums: loss, gradient norm
        for idx in sampler.batches(epoch, device, start=at.step - epoch * sampler.steps_per_epoch):
            if stop_agreed or (state.stop is not None and state.stop.requested and dist.world_size() == 1):
                save(at)
                raise _stopped(state, at.step)
            g = seeded_generator(device, "finetune", seed, at.step, dist.rank())
            x = augment_batch(splits.train_images[idx], splits, g)
            if targets_fn is None:
                x, targets = mixer(x, splits.train_labels[idx], at.step, dist.rank())
            else:
                targets = targets_fn(x, idx)
            lr = schedule(at.step)
            sums += step_fn(x, targets, lr, clip_model=model)
            if ema is not None:
                ema.update_parameters(model)
            at.step, seen = at.step + 1, seen + 1
            if at.step % train.log_every == 0 or at.step % sampler.steps_per_epoch == 0:  # the only host syncs
                stop_agreed = _log_steps(metrics, at.step, at.step / sampler.steps_per_epoch, sums, seen, lr, state, {
                    "train/base_lr": optim.base_lr,
                    "train/images_per_s": seen * train.batch_size / (time.perf_counter() - tick)})
                seen, tick = 0, time.perf_counter()
        at.epoch = epoch + 1
        if len(splits.val_labels) and ((val_every and at.epoch % val_every == 0) or at.epoch == train.epochs):
            at.val = _validate(model, ema, predict, splits, metrics, at)
        if at.epoch % state.every == 0 or at.epoch == train.epochs:
            save(at)
    extra = {"finetune/steps": at.step, "finetune/peak_lr": effective_lr(optim.base_lr, train.batch_size)}
    if ema is not None:
        extra.update({"ema/val_top1": at.val.get("ema/val_top1"),
                      "ema/test_top1": topk_accuracy(predict(ema.module, splits.test_images), splits.test_labels)})
    return EvalOutcome(predict(model, splits.test_images), at.val.get("val/top1"), len(splits.train_labels), extra,
                       head=model.head)


def finetune_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, targets, lr: float, *,
                  loss_fn: Callable, grad_clip: float, dtype: torch.dtype,
                  clip_model: Optional[nn.Module] = None) -> torch.Tensor:
    """One optimizer step on views x [B, 3, H, W] and their targets (labels [B] or soft targets [B, C] for
    classification_loss; whatever ``loss_fn(logits, targets)`` takes); returns the device tensor [loss, gradient norm
    before clipping] (no host sync). ``clip_model``: the unwrapped module whose gradients are measured and clipped
    (default ``step_model``)."""
    with autocast(x.device, dtype):
        loss = loss_fn(step_model(x), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(clip_model or step_model, grad_clip)
    set_lr(optimizer, lr)
    optimizer.step()
    return torch.stack([loss.detach(), grad_norm.to(loss.dtype)])


def _predict(model: nn.Module, images: torch.Tensor, *, splits: LabeledSplits, dtype: torch.dtype) -> torch.Tensor:
    """Logits [N, C] of uint8 images [N, 3, H, W] (eval mode, sharded over ranks)."""
    return extract_features_sharded(model, images, mean=splits.mean, std=splits.std, dtype=dtype)


def _validate(model: nn.Module, ema, predict: Callable, splits: LabeledSplits, metrics: MetricsLog,
              at: Progress) -> dict:
    """Validation top-1 of the raw weights (and of the EMA), logged and printed."""
    val = {"val/top1": topk_accuracy(predict(model, splits.val_images), splits.val_labels)}
    if ema is not None:
        val["ema/val_top1"] = topk_accuracy(predict(ema.module, splits.val_images), splits.val_labels)
    record = metrics.log(at.step, at.epoch, val)
    if dist.is_main():
        print(format_metrics(record), flush=True)
    return val


def _restore(resume: Optional[dict], model: nn.Module, optimizer: torch.optim.Optimizer, ema) -> Progress:
    """Load a fine-tuning checkpoint into the model, optimizer and EMA; where it stood (the start when None)."""
    if resume is None:
        return Progress()
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    if ema is not None:
        ema.load_state_dict(resume["ema"])
    # "val_top1": what checkpoints written before the EMA existed hold instead of "val"
    val = resume.get("val") or ({"val/top1": resume["val_top1"]} if resume.get("val_top1") is not None else {})
    return Progress(resume["step"], resume["epoch"], val)


def _log_steps(metrics: MetricsLog, step: int, epoch: float, sums: torch.Tensor, steps: int, lr: float,
               state: FinetuneState, extra: dict) -> bool:
    """Read the summed [loss, gradient norm] of the last ``steps`` steps (one host sync, zeroing the sums), log and
    print them; returns whether any rank was asked to stop (ranks signalled at different steps stop at the same
    one)."""
    wants_stop = torch.full_like(sums[:1], float(state.stop is not None and state.stop.requested))
    loss, grad_norm, stops = dist.all_reduce_mean(torch.cat([sums, wants_stop])).tolist()
    sums.zero_()
    record = metrics.log(step, epoch, {"train/loss": loss / steps, "train/grad_norm": grad_norm / steps,
                                       "train/lr": lr, **extra})
    if dist.is_main():
        print(format_metrics(record), flush=True)
    return stops > 0


def _stopped(state: FinetuneState, step: int) -> Stopped:
    return Stopped(f"{state.stop.name or 'a stop signal on another rank'} at step {step}; checkpoint {state.path} "
                   "written; the same command continues from there", 128 + (state.stop.signum or signal.SIGTERM))


def _save_finetune_state(state: FinetuneState, model: nn.Module, optimizer: torch.optim.Optimizer, ema,
                         at: Progress) -> None:
    """Atomically, by rank 0: weights, optimizer, EMA, step, completed epochs, last validation top-1, provenance."""
    if state.path is not None and dist.is_main():
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at.step,
                     "epoch": at.epoch, "val": at.val,
                     "ema": ema.state_dict() if ema is not None else None, **state.provenance}, state.path)
    dist.barrier()
