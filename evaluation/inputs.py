"""What an evaluation reads before it runs, all checked before anything is written: the config's combinations, the
encoder (its architecture, size and normalization from the checkpoint), the labeled splits (resized to the
encoder's input size when it was pretrained on another dataset), and a fine-tuning checkpoint to resume.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from augment import image_statistics
from configs.load import recipe_changes
from configs.schema import FinetuneConfig
from core import dist
from core.device import check_fits
from core.errors import UserError
from data import load_source, resized, split_labeled
from rundir.checkpoint import EncoderFile, last_checkpoint, load_file, load_strict, read_encoder
from evaluation.evaluate import LabeledSplits, check_probe_config
from models import ARCHS, create_encoder, is_vit
from models.heads import HeadFeatures, head_depth, head_prefix

TOOLKIT_KEYS = ("mixup_alpha", "cutmix_alpha", "label_smoothing", "grad_clip", "ema_decay")  # train.*, finetune only
HEAD_FEATURES = re.compile(r"head([1-9][0-9]*)")  # eval.features=headK, K from 1
TRAINED_MODES = ("finetune", "distill")  # the evaluations that train the encoder (steps, checkpoints, resume)


def check_config(cfg: FinetuneConfig, dtype: torch.dtype, arch: str) -> None:
    """Combinations of keys that cannot work, refused before anything is written."""
    if dtype == torch.float64:
        raise UserError("train.precision=fp64 is for pretraining exactness checks; use fp32, bf16 or auto here")
    used = [f"train.{key}" for key in TOOLKIT_KEYS if getattr(cfg.train, key)]
    if cfg.optim.layer_decay < 1:
        used.append("optim.layer_decay")
    mixing = cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0
    if used and cfg.eval.mode not in TRAINED_MODES:
        # a student learns on the views themselves: no mixing
        modes = "eval.mode=finetune" if mixing else "eval.mode=finetune and distill"
        raise UserError(f"{', '.join(used)} apply to {modes} only, not eval.mode={cfg.eval.mode}")
    if cfg.optim.layer_decay < 1 and not is_vit(arch):
        raise UserError(f"optim.layer_decay applies to ViTs (their blocks are the layers), not {arch}; leave it at 1")
    if cfg.eval.explain and cfg.eval.mode == "knn":
        raise UserError("eval.explain needs a trained head: eval.mode=linear or finetune, not knn")
    if cfg.train.micro_batch:
        raise UserError("train.micro_batch is pretraining's (a contrastive loss over the whole batch); fine-tuning "
                        "takes whole batches: lower train.batch_size instead")
    if cfg.train.mix_prob != 1.0 and not mixing:
        raise UserError(f"train.mix_prob={cfg.train.mix_prob} has no effect without train.mixup_alpha or "
                        "train.cutmix_alpha > 0")
    if cfg.train.cutmix_switch_prob != 0.5 and not (cfg.train.mixup_alpha > 0 and cfg.train.cutmix_alpha > 0):
        raise UserError(f"train.cutmix_switch_prob={cfg.train.cutmix_switch_prob} chooses between MixUp and CutMix: "
                        "it needs both train.mixup_alpha and train.cutmix_alpha > 0")
    if cfg.train.ema_decay >= 1:
        raise UserError(f"train.ema_decay={cfg.train.ema_decay} must be < 1 (1 would never move from the first weights)")
    if cfg.eval.features != "encoder" and not HEAD_FEATURES.fullmatch(cfg.eval.features):
        raise UserError(f"eval.features={cfg.eval.features!r} is neither encoder nor headK (head1, head2, ...: the "
                        "output of the projection head's K-th layer)")
    if cfg.eval.mode == "distill" and not cfg.teacher:
        raise UserError("eval.mode=distill needs teacher=: a fine-tuning run directory, whose classifier.pt "
                        "predicts the targets")
    if cfg.teacher and cfg.eval.mode != "distill":
        raise UserError(f"teacher= applies to eval.mode=distill only, not eval.mode={cfg.eval.mode}")
    if cfg.eval.mode == "distill" and cfg.eval.val_share_of_labels:
        raise UserError("eval.val_share_of_labels applies to fine-tuning; a distilled student is selected on the "
                        "validation split held out of train (data.val_size), as its teacher should be")
    if cfg.eval.mode == "distill" and mixing:
        raise UserError("train.mixup_alpha and train.cutmix_alpha apply to eval.mode=finetune: a distilled student "
                        "learns the teacher's predictions on the views themselves")
    if cfg.eval.mode != "distill" and (cfg.distill.temperature != 1 or cfg.distill.label_weight):
        raise UserError(f"distill.* apply to eval.mode=distill only, not eval.mode={cfg.eval.mode}")
    if cfg.eval.features != "encoder" and cfg.eval.explain:
        raise UserError(f"eval.explain maps the encoder's last stage; with eval.features={cfg.eval.features} use "
                        "eval.features=encoder")
    if cfg.eval.mode in TRAINED_MODES:
        dist.check_global_batch(cfg.train.batch_size)
    if cfg.eval.mode == "linear":
        check_probe_config(cfg.probe, cfg.data.val_size)


def load_encoder(arch: str, width: Optional[int], source: Optional[EncoderFile], device: torch.device, *,
                 trainable: bool, image_size: int = 32) -> torch.nn.Module:
    """The encoder, with the checkpoint's weights (strict; built for the size it was pretrained at) or random ones
    (built for ``image_size``); frozen unless fine-tuned."""
    try:
        encoder = source.build() if source is not None else create_encoder(arch, width, image_size)
    except ValueError as err:
        raise UserError(f"model.arch={arch} at {image_size} pixels: {err}") from None
    if source is not None:
        load_strict(encoder, source.state, f"checkpoint {str(source.path)!r}")
    encoder = encoder.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    encoder.requires_grad_(trainable)
    say(f"encoder: {arch}" + (f" width {width}" if width else "") + f", {encoder.feature_dim}-d features, "
        f"from {source.path if source else 'random initialization'}")
    return encoder


def features_from(encoder: torch.nn.Module, source: Optional[EncoderFile], features: str) -> torch.nn.Module:
    """What the evaluation reads (eval.features): the encoder itself, or the encoder followed by the first K layers
    of the pretrained projection head (headK, with their batch norms; frozen or trained like the encoder). Refused
    where there is no such layer."""
    match = HEAD_FEATURES.fullmatch(features)
    if match is None:
        return encoder
    if source is None:
        raise UserError(f"eval.features={features} reads a pretrained projection head; checkpoint=none has none")
    head = source.build_head(encoder.feature_dim)
    layers, depth = int(match.group(1)), head_depth(head)
    if not depth:
        raise UserError(f"eval.features={features}: {str(source.path)!r} was pretrained without a projection head "
                        "(model.proj_layers=0); use eval.features=encoder")
    if layers > depth:
        raise UserError(f"eval.features={features}: the projection head of {str(source.path)!r} has {depth} "
                        f"layer(s); choose one of head1 to head{depth}")
    device = next(encoder.parameters()).device
    trainable = any(p.requires_grad for p in encoder.parameters())
    module = HeadFeatures(encoder, head_prefix(head, layers)).to(device)
    module.requires_grad_(trainable)
    say(f"features: {features}, the encoder and the first {layers} of {depth} head layer(s), "
        f"{module.feature_dim}-d")
    return module


def load_labeled_splits(cfg: FinetuneConfig, source: Optional[EncoderFile], device: torch.device
                        ) -> tuple[LabeledSplits, dict]:
    """(the labeled subset of train (eval.label_fraction), the validation split and the test split, on the device,
    normalized as the encoder was pretrained; what results.json says about their size). Checked before the run
    directory is written. An encoder pretrained at another size (the transfer protocol: pretrained on one dataset,
    evaluated on another) gets the images resized to its input size, and the record says so."""
    if cfg.data.unlabeled:
        raise UserError("data.unlabeled is pretraining's: evaluations train and score on labeled images only")
    data = load_source(cfg.data.name, cfg.data.root, download=cfg.data.download, cache_dir=cfg.data.cache_dir,
                       image_size=cfg.data.image_size)
    native = data.image_size
    if source is not None and native != source.image_size:
        data = resized(data, source.image_size)
        say(f"data: {cfg.data.name} images resized from {native}x{native} to {source.image_size}x"
            f"{source.image_size}, the size {str(source.path)!r} was pretrained at")
    sizes = {"data/image_size": data.image_size, "data/resized_from": native if native != data.image_size else None}
    check_fits(data.train_images.numel() + data.test_images.numel(), device, f"data.name={cfg.data.name}")
    train_idx, val_idx = split_labeled(data.train_labels, cfg.data.val_size, cfg.eval.label_fraction,
                                       cfg.data.train_limit, cfg.data.split_seed, cfg.eval.val_share_of_labels)
    where = "within the labeled fraction" if cfg.eval.val_share_of_labels else "held out of train"
    say(f"data: {len(train_idx)} labeled train ({cfg.eval.label_fraction * 100:g}% of the labels) / "
        f"{len(val_idx)} val ({where}) / {len(data.test_labels)} test images on {device}, "
        f"{dist.world_size()} process(es)")
    if not len(data.test_labels):
        raise UserError(f"data.root {cfg.data.root!r} has no test split (test/<class>/*); evaluations score it")
    statistics = source.statistics() if source else image_statistics(data.train_images[train_idx])
    labeled = None
    if cfg.eval.mode == "distill":  # the student trains on every training image; the fraction's labels are marked
        pool, _ = split_labeled(data.train_labels, cfg.data.val_size, 1.0, cfg.data.train_limit, cfg.data.split_seed)
        labeled, train_idx = torch.isin(pool, train_idx).to(device), pool
        say(f"data: the student learns the teacher's predictions on all {len(pool)} training images, "
            f"{int(labeled.sum())} of them labeled")
    if cfg.eval.mode in TRAINED_MODES and cfg.train.batch_size > len(train_idx):
        images = "labeled training" if labeled is None else "training"
        raise UserError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(train_idx)} {images} images; "
                        "lower train.batch_size")
    return LabeledSplits(data.train_images[train_idx].to(device), data.train_labels[train_idx].to(device),
                         data.train_images[val_idx].to(device), data.train_labels[val_idx].to(device),
                         data.test_images.to(device), data.test_labels.to(device), list(data.classes),
                         *statistics, labeled=labeled), sizes


def say(text: str) -> None:
    """Print on rank 0 only (every rank of a torchrun job computes the same numbers)."""
    if dist.is_main():
        print(text, flush=True)


def read_source(checkpoint: str) -> Optional[EncoderFile]:
    """The pretrained encoder named by ``checkpoint=``; None for ``none`` (random initialization)."""
    if not checkpoint:
        raise UserError("checkpoint= is required: a pretraining run directory, its checkpoints/last.pt, an "
                        "encoder.pt, or checkpoint=none for a randomly initialized encoder")
    return None if checkpoint.lower() == "none" else read_encoder(checkpoint)


def encoder_arch(cfg: FinetuneConfig, source: Optional[EncoderFile]) -> tuple[str, Optional[int]]:
    """(arch, width): the checkpoint's; model.* only names the architecture when starting from scratch."""
    if source is None:
        if cfg.model.arch is None:
            raise UserError(f"checkpoint=none needs model.arch ({', '.join(ARCHS[:-1])} or {ARCHS[-1]})")
        if cfg.model.width is not None and is_vit(cfg.model.arch):
            raise UserError(f"model.width applies to ResNets only, not {cfg.model.arch}")
        return cfg.model.arch, cfg.model.width
    asked = (cfg.model.arch or source.arch, cfg.model.width if cfg.model.width is not None else source.width)
    if asked != (source.arch, source.width):
        raise UserError(f"checkpoint {str(source.path)!r} holds a {source.arch} (width {source.width}) encoder, but "
                        f"model.arch={asked[0]} model.width={asked[1]} was given; leave model.* unset to use it")
    return source.arch, source.width


def find_resume_state(cfg: FinetuneConfig, run_dir: Path, checkpoint_sha: Optional[str],
                      teacher_sha: Optional[str] = None) -> Optional[dict]:
    """A fine-tuning or distillation run's checkpoint to continue from, checked to hold the same encoder, teacher and
    recipe; None to start (or start over: linear probes and kNN keep no checkpoints)."""
    path = last_checkpoint(run_dir)
    if cfg.eval.mode not in TRAINED_MODES or not path.is_file():
        return None
    state = load_file(path)
    if "model" not in state or "config" not in state:
        raise UserError(f"{str(path)!r} is not a fine-tuning checkpoint (no model/config)")
    if state.get("checkpoint_sha256") != checkpoint_sha:
        raise UserError(f"cannot resume {str(path)!r}: it fine-tunes another encoder than checkpoint={cfg.checkpoint}"
                        " (SHA-256 differs); choose another run.name")
    if state.get("teacher_sha256") != teacher_sha:
        raise UserError(f"cannot resume {str(path)!r}: it learns from another teacher than teacher={cfg.teacher} "
                        "(SHA-256 of classifier.pt differs); choose another run.name")
    changed = recipe_changes(state["config"], cfg, FinetuneConfig)
    if changed:
        raise UserError(f"cannot resume {str(path)!r}: it was trained with another recipe ({'; '.join(changed)}); "
                        "choose another run.name")
    say(f"resume: from epoch {state['epoch']}, step {state['step']} ({path})")
    return state
