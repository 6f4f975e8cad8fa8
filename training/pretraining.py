"""The pieces of pretrain.py's loop: the model, optimizer and step it builds, the records it keeps (metrics.jsonl,
W&B, the console), the checks it runs (divergence, collapse) and the evaluations it logs. pretrain.py's main() reads
top to bottom with these; the checkpoint and resume logic is training/resume.py.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from tqdm import tqdm

from augment import SimCLRAugment, normalization
from configs.load import to_dict, to_yaml
from configs.schema import LossConfig, PretrainConfig
from core import dist
from core.device import check_fits
from core.errors import Diverged, UserError
from core.files import write_json, write_text_atomic
from data import EpochSampler, balanced_subset, load_source, seeded_generator, split_train_val
from evaluation.accuracy import topk_accuracy
from rundir.checkpoint import ENCODER_FILE, last_checkpoint, sha256_of
from evaluation.evaluate import LabeledSplits, check_probe_config, linear_evaluation, results_record
from evaluation.knn import extract_features, extract_features_sharded, knn_top1
from training.micro_batch import forward_backward_in_chunks
from optim.optimizers import optimizer_and_schedule, set_lr
from rundir.plots import save_embedding_map, save_training_curves, view_pair_grid
from rundir.preemption import StopRequest
from rundir.tracking import MetricsLog, format_metrics, git_sha, run_facts, start_wandb, write_results
from losses.diagnostics import embedding_stats
from models import SimCLR, create_encoder, is_vit, projection_head
from models.vit import patch_size_for
from models.global_bn import convert_to_global_bn
from models.view_bn import per_view_batch_norm

EMBEDDING_IMAGES = 1000  # validation images in the W&B embedding table at the end of pretraining


def check_config(cfg: PretrainConfig) -> None:
    """Combinations of keys that cannot work, refused before anything is read or written."""
    dist.check_global_batch(cfg.train.batch_size)
    per_process, micro = cfg.train.batch_size // dist.world_size(), cfg.train.micro_batch
    if micro and (micro > per_process or per_process % micro):
        raise UserError(f"train.micro_batch={micro} must divide the per-process batch of {per_process} images "
                        f"(train.batch_size={cfg.train.batch_size} over {dist.world_size()} process(es)) and not "
                        "exceed it; 0 turns micro-batching off")
    if cfg.eval.knn_every and not (cfg.data.val_size or cfg.eval.knn_test_monitor):
        raise UserError("eval.knn_every > 0 needs a validation split: set data.val_size > 0 (or eval.knn_every=0)")
    if cfg.eval.linear_at_end:
        check_probe_config(cfg.probe, cfg.data.val_size)
    if cfg.data.unlabeled and cfg.eval.online_linear:
        raise UserError("eval.online_linear trains on labeled batches, and with data.unlabeled=true most images have "
                        "no label: score the encoder with eval.linear_at_end=true (or finetune.py) instead")
    if cfg.loss.name == "supcon" and cfg.data.unlabeled:
        raise UserError("loss.name=supcon takes the positives from the labels, and with data.unlabeled=true most "
                        "images have none: use loss.name=ntxent (or dcl, dclw) or data.unlabeled=false")
    if cfg.loss.dcl_sigma != LossConfig.dcl_sigma and cfg.loss.name != "dclw":
        raise UserError(f"loss.dcl_sigma={cfg.loss.dcl_sigma} weights DCLW's positives: it applies to loss.name=dclw "
                        f"only, not {cfg.loss.name}")
    if cfg.aug.local_crops:
        if not cfg.aug.crop:
            raise UserError("aug.local_crops are crops: they need aug.crop=true")
        if cfg.aug.local_min_scale > cfg.aug.local_max_scale:
            raise UserError(f"aug.local_min_scale={cfg.aug.local_min_scale} exceeds aug.local_max_scale="
                            f"{cfg.aug.local_max_scale}")
        if cfg.model.forward_views == "separate":
            raise UserError("model.forward_views=separate normalizes two views per batch; with aug.local_crops use "
                            "model.forward_views=joint")
    if cfg.model.forward_views == "separate" and cfg.model.sync_bn and dist.world_size() > 1:
        raise UserError("model.forward_views=separate computes per-view statistics on each process; global batch norm "
                        "per view is not implemented: set model.sync_bn=false (the peers' default) or "
                        "model.forward_views=joint")


def load_splits(cfg: PretrainConfig, device: torch.device) -> tuple[LabeledSplits, torch.Tensor]:
    """(uint8 train / validation / test images and labels on ``device`` with the encoder's input normalization, the
    images pretraining trains on: the labeled training split, plus the unlabeled images with data.unlabeled). The
    validation split (data.val_size) is held out of the labeled train; the test split is only read by evaluations.
    A dataset that does not fit the device is refused before it is moved there."""
    data = load_source(cfg.data.name, cfg.data.root, download=cfg.data.download, cache_dir=cfg.data.cache_dir,
                       image_size=cfg.data.image_size, unlabeled=cfg.data.unlabeled)
    if not len(data.test_labels) and (cfg.eval.knn_test_monitor or cfg.eval.online_linear or cfg.eval.linear_at_end):
        raise UserError(f"data.root {cfg.data.root!r} has no test split (test/<class>/*), which eval.knn_test_monitor, "
                        "eval.online_linear and eval.linear_at_end score")
    train_idx, val_idx = split_train_val(data.train_labels, cfg.data.val_size, cfg.data.train_limit,
                                         cfg.data.split_seed)
    check_fits(sum(t.numel() for t in (data.train_images, data.test_images, data.unlabeled_images)), device,
               f"data.name={cfg.data.name} (uint8 images: train, test and unlabeled)")
    train = data.train_images[train_idx].to(device)
    images = torch.cat([train, data.unlabeled_images.to(device)]) if cfg.data.unlabeled else train
    splits = LabeledSplits(train, data.train_labels[train_idx].to(device), data.train_images[val_idx].to(device),
                           data.train_labels[val_idx].to(device), data.test_images.to(device),
                           data.test_labels.to(device), list(data.classes), *normalization(cfg.aug.normalize, images))
    return splits, images


def build_model(cfg: PretrainConfig, device: torch.device, dtype: torch.dtype = torch.float32,
                num_classes: Optional[int] = None, image_size: int = 32) -> SimCLR:
    """Encoder + projection head + loss settings from the config, on ``device``; global batch norm under torchrun.
    ``num_classes`` adds the online linear classifier (eval.online_linear).

    Parameters are fp64 when ``dtype`` is (train.precision=fp64), fp32 otherwise (bf16 autocasts the encoder and
    head, the loss stays fp32: ``SimCLR.compute_dtype``); on CUDA the
    model is channels_last (NHWC: the layout cuDNN's fastest convolutions and bf16 tensor cores want). The encoder is
    built for ``image_size`` pixels (a ViT's patch grid, a ResNet's stem: model.stem)."""
    try:
        encoder = create_encoder(cfg.model.arch, cfg.model.width, image_size, cfg.model.stem)
    except ValueError as err:
        raise UserError(f"model.arch={cfg.model.arch} at {image_size} pixels: {err}") from None
    hidden = cfg.model.proj_hidden_dim or encoder.feature_dim
    head = projection_head(encoder.feature_dim, hidden, cfg.model.proj_dim, cfg.model.proj_layers,
                           hidden_bn=cfg.model.proj_bn, out_bn=cfg.model.proj_out_bn)
    model = SimCLR(encoder, head, cfg.loss.temperature, loss_impl=cfg.loss.impl, gather=dist.world_size() > 1,
                   num_classes=num_classes, compute_dtype=dtype, loss_name=cfg.loss.name,
                   dcl_sigma=cfg.loss.dcl_sigma)
    if cfg.model.sync_bn and dist.world_size() > 1:  # statistics over the global batch, as in the paper
        model = convert_to_global_bn(model, device)
    if cfg.model.forward_views == "separate":  # per-view statistics, as the peers' two forward passes give
        model = per_view_batch_norm(model)
    model = model.to(device, dtype=torch.float64 if dtype == torch.float64 else None)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def build_augment(cfg: PretrainConfig, splits: LabeledSplits, image_size: int) -> SimCLRAugment:
    """The view augmentation of aug.*, normalizing as the encoder's inputs are (``splits.mean``, ``splits.std``);
    multi-crop's small views at aug.local_size pixels (0: half of ``image_size``), which a ViT must split into
    patches."""
    local_size = cfg.aug.local_size or image_size // 2
    if cfg.aug.local_crops and is_vit(cfg.model.arch) and local_size % patch_size_for(image_size):
        raise UserError(f"aug.local_size={local_size}: {cfg.model.arch} at {image_size} pixels takes views whose size "
                        f"divides into {patch_size_for(image_size)}-pixel patches")
    return SimCLRAugment(strength=cfg.aug.strength, min_scale=cfg.aug.min_scale, jitter_prob=cfg.aug.jitter_prob,
                         gray_prob=cfg.aug.gray_prob, blur_prob=cfg.aug.blur_prob, solarize_prob=cfg.aug.solarize_prob,
                         mean=splits.mean, std=splits.std, crop=cfg.aug.crop, local_crops=cfg.aug.local_crops,
                         local_size=local_size, local_scale=(cfg.aug.local_min_scale, cfg.aug.local_max_scale))


def build_optimizer(cfg: PretrainConfig, model: SimCLR, steps_per_epoch: int
                    ) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """The optimizer over the model's parameter groups (the online classifier's its own) and the lr schedule."""
    return optimizer_and_schedule(cfg.optim, model, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs,
                                  steps_per_epoch=steps_per_epoch, restarts=cfg.train.schedule_restarts,
                                  own_groups=online_classifier_group(cfg), trust_coeff=cfg.optim.lars_trust_coeff,
                                  trust_clip=cfg.optim.lars_trust_clip)


def online_classifier_group(cfg: PretrainConfig) -> Optional[dict]:
    """The online classifier's own parameter group, solo-learn's set-up: its lr (eval.online_lr, scaled by batch like
    optim.base_lr) follows the same warm-up + cosine shape, no weight decay; under LARS its weight matrix is adapted
    with the run's trust coefficient and clipping (optim.lars_*), its bias is not."""
    if not cfg.eval.online_linear:
        return None
    return {"classifier.": {"weight_decay": 0.0, "always_adapt": True,
                            "lr_scale": cfg.eval.online_lr / cfg.optim.base_lr}}


@dataclass
class StepContext:
    """What every training step needs besides its batch, in one typed place (the most-read code in the project)."""

    model: torch.nn.Module  # runs the step: the SimCLR module, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    augment: SimCLRAugment
    device: torch.device
    dtype: torch.dtype  # the model's compute precision (fp64: the views are made double for it)
    micro_batch: int = 0  # images per chunk per process (train.micro_batch); 0 or the whole batch: one pass
    simclr: Optional[SimCLR] = None  # the unwrapped module under `model`, for the micro-batched step


def train_step(ctx: StepContext, images: torch.Tensor, generator: torch.Generator, lr: float,
               labels: Optional[torch.Tensor] = None) -> dict:
    """Augment, forward, backward, optimizer step on one uint8 batch [B, 3, H, W] (labels [B]: for the online
    classifier and SupCon); returns the model's output."""
    shard = (dist.rank(), dist.world_size())
    view1, view2 = ctx.augment(images, generator, shard=shard)
    local = ctx.augment.local(images, generator, shard=shard) if ctx.augment.local_crops else None
    ctx.optimizer.zero_grad(set_to_none=True)
    out = forward_backward(ctx, view1, view2, labels, local)
    set_lr(ctx.optimizer, lr)
    ctx.optimizer.step()
    return out


def forward_backward(ctx: StepContext, view1: torch.Tensor, view2: torch.Tensor,
                     labels: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None) -> dict:
    """Loss of two view batches [B, 3, H, W] (and multi-crop's small views [K B, 3, h, w]) in the run's precision
    and memory layout, and its backward pass; returns the model's output (gradients accumulate into the
    parameters)."""
    views = [v for v in (view1, view2, local) if v is not None]
    if ctx.dtype == torch.float64:  # train.precision=fp64: the whole model in double precision
        views = [v.double() for v in views]
    if ctx.device.type == "cuda":
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    view1, view2, local = views[0], views[1], views[2] if local is not None else None
    if 0 < ctx.micro_batch < view1.shape[0]:  # exact large batches: cached projection gradients, chunk by chunk
        return forward_backward_in_chunks(ctx.model, ctx.simclr, view1, view2, ctx.micro_batch, labels, local)
    out = ctx.model(view1, view2, labels, local_views=local)  # bf16 autocast, where asked for, is inside
    # The online classifier's loss reaches only its own weights (its input is detached).
    (out["loss"] + out["online_loss"] if "online_loss" in out else out["loss"]).backward()
    return out


@dataclass
class RunRecords:
    """Where a run's records go: its directory, metrics.jsonl (+ W&B), and the clock of time/elapsed_s."""

    cfg: PretrainConfig
    run_dir: Path
    metrics: MetricsLog
    wandb_run: Optional[object]  # rundir.tracking.WandbRun on rank 0 when W&B is on
    steps_per_epoch: int
    started: float = field(default_factory=time.perf_counter)  # training began in this process
    elapsed_before: float = 0.0  # seconds trained by the processes before this one (from the checkpoint resumed)
    collapse_warned: bool = False
    encoder: dict = field(default_factory=dict)  # what rebuilds and feeds the encoder (training.resume.encoder_record)

    @property
    def checkpoint(self) -> Path:
        return last_checkpoint(self.run_dir)

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes (time/elapsed_s), so curves against time never run backwards."""
        return self.elapsed_before + time.perf_counter() - self.started


def open_records(cfg: PretrainConfig, run_dir: Path, wandb_cfg, resume: Optional[dict], steps_per_epoch: int,
                 device: torch.device) -> RunRecords:
    """The W&B run (the same one on resume), config.yaml and metrics.jsonl of the run directory. W&B starts first:
    a run whose W&B start fails leaves no config.yaml (tables would list it as a started run)."""
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = start_wandb(wandb_cfg, job_type="pretrain", config=to_dict(cfg), run_dir=run_dir,
                            run_id=resume.get("wandb_run_id") if resume else None, enabled=dist.is_main(),
                            **run_facts(device))
    if dist.is_main():
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main(), wandb_run=wandb_run)
    return RunRecords(cfg, run_dir, metrics, wandb_run, steps_per_epoch,
                      elapsed_before=float(resume.get("elapsed_s", 0.0)) if resume else 0.0)


def log_view_pairs(wandb_run, augment: SimCLRAugment, images: torch.Tensor, seed: int) -> None:
    """What the encoder is shown: the first step's two views of 16 images (uint8 [16, 3, H, W]), as a W&B image."""
    view1, view2 = augment(images, seeded_generator(images.device, "augment", seed, 0))
    wandb_run.log_image("media/view_pairs", view_pair_grid(view1, view2, augment.mean, augment.std),
                        caption="16 training images, two augmented views each (left, right)")


def progress(sampler: EpochSampler, epoch: int, step: int, device: torch.device) -> Iterable[torch.Tensor]:
    """The epoch's remaining index batches (all, unless a mid-epoch checkpoint was resumed), with a progress bar
    on a terminal."""
    done_in_epoch = step - epoch * sampler.steps_per_epoch
    batches = sampler.batches(epoch, device, start=done_in_epoch)
    if sys.stderr.isatty() and dist.is_main():
        return tqdm(batches, total=sampler.steps_per_epoch - done_in_epoch, desc=f"epoch {epoch + 1}", leave=False)
    return batches


class Interval:
    """What the steps between two log points add up to, kept on the device: no host sync until it is read."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)  # the mean over ranks must not round
        self.online_correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps, self.views, self.tick = 0, 0, time.perf_counter()

    def add(self, out: dict) -> None:
        self.loss += out["loss"].detach()
        if "online_correct" in out:
            self.online_correct += out["online_correct"]
        small = out["z_local"].shape[0] if "z_local" in out else 0
        self.steps, self.views = self.steps + 1, self.views + 2 * out["z1"].shape[0] + small

    def restart(self) -> None:
        self.loss.zero_()
        self.online_correct.zero_()
        self.steps, self.views, self.tick = 0, 0, time.perf_counter()


def log_interval(run: RunRecords, interval: Interval, out: dict, model: SimCLR, step: int, lr: float,
                 stop_requested: bool, batches: Iterable) -> bool:
    """Read the interval (the only host sync of the loop), stop on divergence, log and show (the progress bar's
    postfix on a terminal, a printed line elsewhere); returns whether any rank was asked to stop."""
    loss, weights_finite, stop_agreed = read_training_state(interval.loss, model, stop_requested)
    loss = check_finite(loss / interval.steps, step, run, weights_finite)
    seconds = time.perf_counter() - interval.tick
    stats = {f"train/{k}": v.item() for k, v in embedding_stats(out["z1"], out["z2"]).items()}
    warn_if_collapsed(run, step, stats["train/erank"], stats["train/neg_cos"])
    if run.cfg.eval.online_linear:  # on this rank's augmented views of the interval
        stats["online/train_top1"] = 100.0 * interval.online_correct.item() / interval.views
    record = run.metrics.log(step, step / run.steps_per_epoch, {
        "train/loss": loss, "train/lr": lr, "train/base_lr": run.cfg.optim.base_lr,
        "train/views_per_s": interval.views * dist.world_size() / seconds,
        "time/elapsed_s": run.elapsed(), **stats})
    if isinstance(batches, tqdm):
        batches.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
    elif dist.is_main():
        print(format_metrics(record), flush=True)
    interval.restart()
    return stop_agreed


# Collapse, judged on the effective rank of the unit projections' covariance (embedding_stats' erank: rotation
# invariant; views on k points have at most k - 1, one point 0). Measured with bench/collapse.py and metrics.jsonl on
# this 2-core CPU (docs/accuracy.md): healthy ResNet-18 width 8 runs of simclr_ablations_cpu end at erank 9.1-16.4
# (13-28 at initialization); SGD at base lr 1e6 (weights exploding, finite loss, kNN 19.8 -> 9.9) logs erank 1.2-5.0,
# 2.2 on average over its last epoch. Tiny synthetic CI runs: healthy 13-16, exploded 2.0-3.2. Threshold in between:
# below 4 (or a quarter of the projection dimension, if smaller). Judged after the first epoch and, for summary.json,
# on the mean of the last epoch. The mean negative cosine (train/neg_cos) is reported beside it but does not decide:
# heads without batch norm sit at 0.87-0.94 early in healthy runs (dkobak's recipe), the exploded run at 0.70-0.94.
# lightly's z_std (train/z_std) is still logged, but depends on the axes: two antipodal points give 0.8, a healthy
# embedding along a few axes 0.25-0.64.
COLLAPSE_ERANK = 4.0


def looks_collapsed(erank: float, dim: int) -> bool:
    """The collapse rule above, for an embedding of ``dim`` dimensions."""
    return erank < min(COLLAPSE_ERANK, dim / 4)


def warn_if_collapsed(run: RunRecords, step: int, erank: float, neg_cos: float) -> None:
    """One stderr warning the first time the embeddings look collapsed after the first epoch."""
    if (step > run.steps_per_epoch and looks_collapsed(erank, run.cfg.model.proj_dim)
            and not run.collapse_warned and dist.is_main()):
        run.collapse_warned = True
        print(f"warning: the embeddings look collapsed at step {step} (train/erank {erank:.2f}, train/neg_cos "
              f"{neg_cos:.3f}: the views of all images lie on a few points); summary.json records whether it lasts "
              "to the end. Often a learning rate that is too high", file=sys.stderr, flush=True)


def collapse_summary(metrics: MetricsLog, epochs: int, dim: int) -> dict:
    """The last epoch's mean train/erank, train/neg_cos and train/z_std and whether they mark a collapsed run, from
    metrics.jsonl (resumes too)."""
    last = [r for r in metrics.records("train/erank") if r["epoch"] > epochs - 1 and "train/neg_cos" in r]
    if not last:
        return {}
    means = {key: sum(r[key] for r in last) / len(last) for key in ("train/erank", "train/neg_cos", "train/z_std")
             if all(key in r for r in last)}
    return {**{k: round(v, 4) for k, v in means.items()},
            "collapsed": looks_collapsed(means["train/erank"], dim)}


def stopped_message(stop: StopRequest, step: int, run: RunRecords) -> str:
    return (f"{stop.name or 'a stop signal on another rank'} at step {step} (epoch {step / run.steps_per_epoch:.2f}); "
            f"checkpoint {run.checkpoint} written; the same command continues from there")


def monitor_metrics(model: SimCLR, splits: LabeledSplits, cfg: PretrainConfig, dtype: torch.dtype) -> dict:
    """What each evaluation during pretraining logs: kNN top-1 (%) on the validation split with the training images
    as the bank (``knn/top1``), the online classifier's validation top-1 (``online/val_top1``) and, as a monitoring
    option only, kNN top-1 on the test split (``knn_test/top1``, eval.knn_test_monitor). One extraction per split."""
    # Under torchrun each rank extracts its share of the images; the features are gathered back in order.
    features = partial(extract_features_sharded, model.encoder, mean=splits.mean, std=splits.std, dtype=dtype)
    vote = partial(knn_top1, features(splits.train_images), splits.train_labels, num_classes=splits.num_classes,
                   k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, vote=cfg.eval.knn_vote)
    values = {}
    if len(splits.val_labels):
        val = features(splits.val_images)
        values["knn/top1"] = vote(val, splits.val_labels)
        if model.classifier is not None:
            values["online/val_top1"] = online_top1(model, val, splits.val_labels)
    if cfg.eval.knn_test_monitor:
        values["knn_test/top1"] = vote(features(splits.test_images), splits.test_labels)
    return values


@torch.no_grad()
def online_top1(model: SimCLR, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) of the online classifier on clean features [N, d] (eval-mode encoder)."""
    return topk_accuracy(model.classifier(features.to(model.classifier.weight.dtype)), labels)


def online_classifier_results(model: SimCLR, splits: LabeledSplits, dtype: torch.dtype) -> dict:
    """The online classifier scored once at the end: validation and test top-1 (%)."""
    features = partial(extract_features_sharded, model.encoder, mean=splits.mean, std=splits.std, dtype=dtype)
    results = {"online/test_top1": online_top1(model, features(splits.test_images), splits.test_labels)}
    if len(splits.val_labels):
        results["online/val_top1"] = online_top1(model, features(splits.val_images), splits.val_labels)
    return results


def log_evaluation(run: RunRecords, step: int, epoch: float, values: dict) -> dict:
    """Log and print evaluation metrics with the seconds of training so far (0 before the first step)."""
    elapsed = run.elapsed() if step else 0.0
    record = run.metrics.log(step, epoch, {**values, "time/elapsed_s": elapsed})
    if dist.is_main():
        print(format_metrics(record), flush=True)
    return values


def final_knn(metrics: MetricsLog) -> dict:
    """kNN top-1 at initialization and at the end, read back from metrics.jsonl (the source of truth); with the
    test monitor also its last value and lightly's maximum over epochs (optimistic: chosen on the test split)."""
    records = metrics.records()
    knn = [r["knn/top1"] for r in records if "knn/top1" in r]
    test = [r["knn_test/top1"] for r in records if "knn_test/top1" in r]
    summary = {"knn/init_top1": knn[0], "knn/top1": knn[-1]} if knn else {}
    if test:
        summary.update({"knn_test/top1": test[-1], "knn_test/max_top1": max(test)})
    return summary


def linear_probe_at_end(cfg: PretrainConfig, encoder: torch.nn.Module, splits: LabeledSplits, dtype: torch.dtype,
                        run_dir: Path) -> dict:
    """The paper's number in the same command: the linear probe (probe.*) of the final encoder -> results.json."""
    outcome = linear_evaluation(encoder, splits, cfg.probe, seed=cfg.seed, dtype=dtype)
    record = results_record(outcome, splits, mode="linear", label_fraction=1.0, checkpoint=str(run_dir / ENCODER_FILE),
                            checkpoint_sha256=sha256_of(run_dir / ENCODER_FILE), git_sha=git_sha(),
                            config=to_dict(cfg))
    path = write_results(run_dir, record, splits.classes)
    print(f"linear probe: test top-1 {record['test/top1']:.2f}% (val top-1 {record['val/top1']}) -> {path}", flush=True)
    return {"linear/test_top1": record["test/top1"], "linear/val_top1": record["val/top1"]}


def save_pictures(run: RunRecords, encoder: torch.nn.Module, splits: LabeledSplits, dtype: torch.dtype) -> list[Path]:
    """curves.png and embedding.png (eval.plots) in the run directory, and as W&B media; returns what was written."""
    title = f"{run.run_dir.name}: {run.cfg.model.arch}, {run.cfg.train.epochs} epochs"
    written = [run.run_dir / "curves.png"]
    save_training_curves(run.metrics.records(), written[0], title)
    if len(splits.val_labels):
        shown = embedding_images(splits.val_labels, run.cfg.seed)
        features = extract_features(encoder, splits.val_images[shown], mean=splits.mean, std=splits.std, dtype=dtype)
        written.append(run.run_dir / "embedding.png")
        save_embedding_map(features, splits.val_labels[shown], splits.classes, written[1],
                           f"{title}: t-SNE of {len(features)} validation features", seed=run.cfg.seed)
    if run.wandb_run is not None:
        for path in written:
            run.wandb_run.log_png(f"media/{path.stem}", path, caption=title)
    return written


def embedding_images(val_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices of the EMBEDDING_IMAGES validation images that embedding.png and the W&B projector show: class-balanced
    and seeded (the split lists its images in index order, which for an image folder is class by class)."""
    return balanced_subset(val_labels.cpu(), EMBEDDING_IMAGES, seed).to(val_labels.device)


def finish_wandb(wandb_run, encoder: torch.nn.Module, splits: LabeledSplits, dtype: torch.dtype, run_dir: Path,
                 summary: dict, step: int, epoch: int, seed: int = 0) -> None:
    """The end of the W&B run: validation embeddings for the projector, encoder.pt as a model artifact, summary."""
    if len(splits.val_labels):
        shown = embedding_images(splits.val_labels, seed)
        features = extract_features(encoder, splits.val_images[shown], mean=splits.mean, std=splits.std, dtype=dtype)
        wandb_run.log_embeddings("val/embeddings", features, splits.val_labels[shown], splits.classes, step, epoch)
    wandb_run.log_encoder(run_dir / ENCODER_FILE, run_dir.name, {"git_sha": git_sha(), **summary})
    wandb_run.summarize(summary)
    wandb_run.finish()


def read_training_state(loss_sum: torch.Tensor, model: torch.nn.Module, stop_requested: bool
                        ) -> tuple[float, bool, bool]:
    """(summed loss averaged over ranks, whether every parameter and batch-norm statistic is finite on every rank,
    whether any rank was asked to stop), in one host read. A run can diverge with a finite loss (weights of 1e20,
    infinite running variances); ranks that got a preemption signal at different steps stop at the same one."""
    finite = torch.stack([t.isfinite().all() for t in itertools.chain(model.parameters(), model.buffers())
                          if t.is_floating_point()]).all()
    stop = torch.full((), float(stop_requested), dtype=torch.float64, device=loss_sum.device)
    loss, nonfinite, stops = dist.all_reduce_mean(torch.stack([loss_sum.double(), (~finite).double(), stop])).tolist()
    return loss, nonfinite == 0, stops > 0


def check_finite(loss: float, step: int, run: RunRecords, weights_finite: bool = True) -> float:
    """The loss, or stop: summary.json records the divergence (a result, not a crash) and the run exits 3."""
    if not (math.isfinite(loss) and weights_finite):
        run_dir, wandb_run = run.run_dir, run.wandb_run
        kept = f"the last good checkpoint is {run.checkpoint}" if run.checkpoint.is_file() else \
            "no checkpoint was written"
        what = (f"loss became {loss}" if not math.isfinite(loss)
                else "weights or batch-norm statistics became non-finite")
        if dist.is_main():
            summary = {"status": "diverged", "step": step, "train/loss": str(loss), "reason": what,
                       "git_sha": git_sha()}
            write_json(run_dir / "summary.json", summary)
            if wandb_run is not None:
                wandb_run.summarize(summary)
                wandb_run.finish()
        raise Diverged(f"{what} at step {step}; stopping ({kept}). Try a lower optim.base_lr")
    return loss
