"""Evaluate an encoder on labeled data. Run: python finetune.py checkpoint=RUN_DIR [--config FILE] [key=value ...]

eval.mode: ``linear`` (frozen features, linear classifier, weight decay chosen on the validation split), ``finetune``
(whole network plus a new head on eval.label_fraction of the labels) or ``knn`` (weighted kNN). ``checkpoint`` is a
pretraining run directory, its checkpoints/last.pt or an encoder.pt; ``checkpoint=none`` starts from random weights
(model.arch needed): with eval.mode=finetune and eval.label_fraction=1.0 that is the supervised baseline.
The run directory <run.dir>/<run.name>/ gets config.yaml, metrics.jsonl, results.json and confusion.png.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from augment import NORMALIZATIONS
from configs.load import load_config, recipe_changes, to_dict, to_yaml
from configs.schema import FinetuneConfig
from data import load_source, split_labeled
from core import dist
from core.files import atomic_save, write_text_atomic
from engine.checkpoint import (CLASSIFIER_FILE, EncoderFile, classifier_state, last_checkpoint, load_file, load_strict,
                               read_encoder, sha256_of)
from core.errors import UserError
from engine.cli import run_cli
from core.device import resolve_device, resolve_precision
from engine.evaluate import (EvalOutcome, LabeledSplits, check_probe_config, knn_evaluation, linear_evaluation,
                             results_record)
from engine.explain import explain_test_images, method_for
from engine.export import Deployable
from engine.finetuning import FinetuneState, finetune_evaluation
from engine.preemption import StopRequest
from engine.runlock import hold_run_dir
from engine.tracking import (MetricsLog, decide_wandb_mode, git_sha, keep_wandb_out, run_facts, start_wandb,
                             write_results)
from models import ARCHS, create_encoder, is_vit

MODE_NAMES = {"linear": "linear probe", "finetune": "fine-tuning", "knn": "kNN"}


def main(argv: Sequence[str]) -> dict:
    """Evaluate as the command line says. Fine-tuning stops on SIGTERM, SIGUSR1 and SIGINT after a checkpoint at
    that step; linear probes and kNN (minutes) are simply run again."""
    with contextlib.ExitStack() as held:
        return evaluation(argv, held)


def evaluation(argv: Sequence[str], held: contextlib.ExitStack) -> dict:
    # ---------------------------------------------------------------- config and checkpoint (all checks first)
    cfg = load_config(argv, FinetuneConfig, prog="finetune.py")
    keep_wandb_out(cfg.wandb.mode)
    device = dist.init_from_env(resolve_device(cfg.device), cfg.run.backend)  # torchrun: cuda:LOCAL_RANK
    dtype = resolve_precision(cfg.train.precision, device)
    source = read_source(cfg.checkpoint)
    arch, width = encoder_arch(cfg, source)
    check_config(cfg, dtype, arch)
    run_dir = Path(cfg.run.dir).expanduser() / (cfg.run.name or default_run_name(cfg, source, arch))
    held.enter_context(hold_run_dir(run_dir))  # one writer: a second identical job stops here
    stop = held.enter_context(StopRequest()) if cfg.eval.mode == "finetune" else None  # others just die and rerun
    if (run_dir / "results.json").exists():
        raise UserError(f"run directory {str(run_dir)!r} already holds an evaluation (results.json: finished); "
                        "choose another run.name or remove it")
    checkpoint_sha = sha256_of(source.path) if source else None
    resume = find_resume_state(cfg, run_dir, checkpoint_sha)
    wandb_cfg = decide_wandb_mode(cfg.wandb)  # online | offline in seconds, before any data is loaded
    dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    say(to_yaml(cfg))

    # ---------------------------------------------------------------- encoder: architecture from the checkpoint
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(arch, width, source, device, trainable=cfg.eval.mode == "finetune")

    # ---------------------------------------------------------------- data: labeled splits on the device
    splits = load_labeled_splits(cfg, source, device)

    # ---------------------------------------------------------------- evaluate
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = start_wandb(wandb_cfg, job_type=cfg.eval.mode, config=to_dict(cfg), run_dir=run_dir,
                            enabled=dist.is_main(), **run_facts(device))
    if dist.is_main():  # after W&B started: a failed start leaves no config.yaml behind
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main(), wandb_run=wandb_run)
    metrics.truncate_after(resume["step"] if resume else -1)  # an unfinished evaluation continues or starts over
    if wandb_run is not None and source is not None:
        wandb_run.use_encoder(source.path, source.run_name)
    state = FinetuneState(last_checkpoint(run_dir), cfg.run.ckpt_every,
                          {"config": to_dict(cfg), "checkpoint_sha256": checkpoint_sha}, resume, stop)
    outcome = evaluate(cfg, encoder, splits, dtype, metrics, state)

    # ---------------------------------------------------------------- results
    record = results_record(outcome, splits, mode=cfg.eval.mode, label_fraction=cfg.eval.label_fraction,
                            val_within_fraction=cfg.eval.val_share_of_labels > 0, checkpoint=str(source.path) if source else "none", checkpoint_sha256=checkpoint_sha,
                            git_sha=git_sha(), config=to_dict(cfg))
    classifier = classifier_state(encoder, outcome.head, arch=arch, width=width, classes=splits.classes,
                                  normalize=source.normalize if source else "cifar", mode=cfg.eval.mode,
                                  checkpoint_sha256=checkpoint_sha) if outcome.head is not None else None
    if cfg.eval.explain and dist.is_main():
        explain_grid(arch, Deployable(encoder, splits.mean, splits.std, outcome.head), splits, run_dir, wandb_run)
    publish(record, cfg, arch, splits.classes, classifier, run_dir, metrics, wandb_run,
            outcome.extra.get("finetune/steps", 0))
    dist.barrier()
    dist.shutdown()
    return record


TOOLKIT_KEYS = ("mixup_alpha", "cutmix_alpha", "label_smoothing", "grad_clip", "ema_decay")  # train.*, finetune only


def check_config(cfg: FinetuneConfig, dtype: torch.dtype, arch: str) -> None:
    """Combinations of keys that cannot work, refused before anything is written."""
    if dtype == torch.float64:
        raise UserError("train.precision=fp64 is for pretraining exactness checks; use fp32, bf16 or auto here")
    used = [f"train.{key}" for key in TOOLKIT_KEYS if getattr(cfg.train, key)]
    if cfg.optim.layer_decay < 1:
        used.append("optim.layer_decay")
    if used and cfg.eval.mode != "finetune":
        raise UserError(f"{', '.join(used)} apply to eval.mode=finetune only, not eval.mode={cfg.eval.mode}")
    if cfg.optim.layer_decay < 1 and not is_vit(arch):
        raise UserError(f"optim.layer_decay applies to ViTs (their blocks are the layers), not {arch}; leave it at 1")
    if cfg.eval.explain and cfg.eval.mode == "knn":
        raise UserError("eval.explain needs a trained head: eval.mode=linear or finetune, not knn")
    if cfg.train.micro_batch:
        raise UserError("train.micro_batch is pretraining's (a contrastive loss over the whole batch); fine-tuning "
                        "takes whole batches: lower train.batch_size instead")
    mixing = cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0
    if cfg.train.mix_prob != 1.0 and not mixing:
        raise UserError(f"train.mix_prob={cfg.train.mix_prob} has no effect without train.mixup_alpha or "
                        "train.cutmix_alpha > 0")
    if cfg.train.cutmix_switch_prob != 0.5 and not (cfg.train.mixup_alpha > 0 and cfg.train.cutmix_alpha > 0):
        raise UserError(f"train.cutmix_switch_prob={cfg.train.cutmix_switch_prob} chooses between MixUp and CutMix: "
                        "it needs both train.mixup_alpha and train.cutmix_alpha > 0")
    if cfg.train.ema_decay >= 1:
        raise UserError(f"train.ema_decay={cfg.train.ema_decay} must be < 1 (1 would never move from the first weights)")
    if cfg.eval.mode == "finetune":
        dist.check_global_batch(cfg.train.batch_size)
    if cfg.eval.mode == "linear":
        check_probe_config(cfg.probe, cfg.data.val_size)


def load_encoder(arch: str, width: Optional[int], source: Optional[EncoderFile], device: torch.device, *,
                 trainable: bool) -> torch.nn.Module:
    """The encoder, with the checkpoint's weights (strict) or random ones; frozen unless fine-tuned."""
    encoder = create_encoder(arch, width)
    if source is not None:
        load_strict(encoder, source.state, f"checkpoint {str(source.path)!r}")
    encoder = encoder.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    encoder.requires_grad_(trainable)
    say(f"encoder: {arch}" + (f" width {width}" if width else "") + f", {encoder.feature_dim}-d features, "
        f"from {source.path if source else 'random initialization'}")
    return encoder


def load_labeled_splits(cfg: FinetuneConfig, source: Optional[EncoderFile], device: torch.device) -> LabeledSplits:
    """The labeled subset of train (eval.label_fraction), the validation split and the test split, on the device,
    normalized as the encoder was pretrained; checked before the run directory is written."""
    data = load_source(cfg.data.name, cfg.data.root, download=cfg.data.download, cache_dir=cfg.data.cache_dir)
    train_idx, val_idx = split_labeled(data.train_labels, cfg.data.val_size, cfg.eval.label_fraction,
                                       cfg.data.train_limit, cfg.data.split_seed, cfg.eval.val_share_of_labels)
    where = "within the labeled fraction" if cfg.eval.val_share_of_labels else "held out of train"
    say(f"data: {len(train_idx)} labeled train ({cfg.eval.label_fraction * 100:g}% of the labels) / "
        f"{len(val_idx)} val ({where}) / {len(data.test_labels)} test images on {device}, "
        f"{dist.world_size()} process(es)")
    if not len(data.test_labels):
        raise UserError(f"data.root {cfg.data.root!r} has no test split (test/<class>/*); evaluations score it")
    if cfg.eval.mode == "finetune" and cfg.train.batch_size > len(train_idx):
        raise UserError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(train_idx)} labeled training "
                        "images; lower train.batch_size")
    return LabeledSplits(data.train_images[train_idx].to(device), data.train_labels[train_idx].to(device),
                         data.train_images[val_idx].to(device), data.train_labels[val_idx].to(device),
                         data.test_images.to(device), data.test_labels.to(device), list(data.classes),
                         *input_normalization(source))


def publish(record: dict, cfg: FinetuneConfig, arch: str, classes: list[str], classifier: Optional[dict],
            run_dir: Path, metrics: MetricsLog, wandb_run, steps: int) -> None:
    """The headline numbers into metrics.jsonl; classifier.pt, results.json (last: it marks the run finished),
    confusion.png and W&B by rank 0; the result line."""
    metrics.log(steps, final_epoch(cfg), {k: record[k] for k in ("val/top1", "test/top1", "test/top5", "ema/val_top1",
                                                                  "ema/test_top1") if record.get(k) is not None})
    if not dist.is_main():
        return
    if classifier is not None:
        atomic_save(classifier, run_dir / CLASSIFIER_FILE)
    path = write_results(run_dir, record, classes)
    if wandb_run is not None:
        wandb_run.log_evaluation(record, classes)
        wandb_run.summarize({k: v for k, v in record.items() if k != "config"})
        wandb_run.finish()
    val = f"{record['val/top1']:.2f}%" if record["val/top1"] is not None else "n/a (no validation split)"
    ema = f", EMA weights: test top-1 {record['ema/test_top1']:.2f}%" if "ema/test_top1" in record else ""
    say(f"result: {MODE_NAMES[cfg.eval.mode]} of {arch} on {record['data/train_images']} labeled images: "
        f"test top-1 {record['test/top1']:.2f}% (top-5 {record['test/top5']:.2f}%, val top-1 {val}{ema}) -> {path}")


def explain_grid(arch: str, model: torch.nn.Module, splits: LabeledSplits, run_dir: Path, wandb_run) -> None:
    """eval.explain: Grad-CAM or attention maps of the trained classifier on 16 fixed test images (explain.py's
    grid) into the run directory and W&B."""
    path = run_dir / f"{method_for(arch)}.png"
    shown = explain_test_images(model, splits.test_images, splits.test_labels, splits.classes, arch=arch,
                                run_name=run_dir.name, count=16, path=path)
    if wandb_run is not None:
        wandb_run.log_png(f"explain/{shown['method']}", path, shown["title"])
    say(f"explained: {shown['title']} -> {path}")


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


def input_normalization(source: Optional[EncoderFile]) -> tuple:
    """(mean, std) the encoder was pretrained with (its aug.normalize); CIFAR-10 statistics from scratch."""
    name = source.normalize if source else "cifar"
    if name not in NORMALIZATIONS:
        raise UserError(f"checkpoint {str(source.path)!r} names an unknown input normalization {name!r}")
    return NORMALIZATIONS[name]


def default_run_name(cfg: FinetuneConfig, source: Optional[EncoderFile], arch: str) -> str:
    """<pretraining run>-<mode>[-<percent>pct]-s<seed>, e.g. resnet18-cifar10-s0-finetune-1pct-s0."""
    base = source.run_name if source else f"scratch-{arch}"
    pct = f"-{cfg.eval.label_fraction * 100:g}pct" if cfg.eval.label_fraction < 1 else ""
    return f"{base}-{cfg.eval.mode}{pct}-s{cfg.seed}"


def find_resume_state(cfg: FinetuneConfig, run_dir: Path, checkpoint_sha: Optional[str]) -> Optional[dict]:
    """A fine-tuning run's checkpoint to continue from, checked to hold the same encoder and recipe; None to start
    (or start over: linear probes and kNN keep no checkpoints)."""
    path = last_checkpoint(run_dir)
    if cfg.eval.mode != "finetune" or not path.is_file():
        return None
    state = load_file(path)
    if "model" not in state or "config" not in state:
        raise UserError(f"{str(path)!r} is not a fine-tuning checkpoint (no model/config)")
    if state.get("checkpoint_sha256") != checkpoint_sha:
        raise UserError(f"cannot resume {str(path)!r}: it fine-tunes another encoder than checkpoint={cfg.checkpoint}"
                        " (SHA-256 differs); choose another run.name")
    changed = recipe_changes(state["config"], cfg, FinetuneConfig)
    if changed:
        raise UserError(f"cannot resume {str(path)!r}: it was trained with another recipe ({'; '.join(changed)}); "
                        "choose another run.name")
    say(f"resume: from epoch {state['epoch']}, step {state['step']} ({path})")
    return state


def evaluate(cfg: FinetuneConfig, encoder: torch.nn.Module, splits: LabeledSplits, dtype: torch.dtype,
             metrics: MetricsLog, state: FinetuneState) -> EvalOutcome:
    if cfg.eval.mode == "knn":
        return knn_evaluation(encoder, splits, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                              vote=cfg.eval.knn_vote, dtype=dtype)
    if cfg.eval.mode == "linear":
        return linear_evaluation(encoder, splits, cfg.probe, seed=cfg.seed, dtype=dtype, augment=cfg.eval.augment,
                                 # refit on train + val only where val holds no label beyond the fraction
                                 refit_allowed=cfg.eval.label_fraction == 1 or cfg.eval.val_share_of_labels > 0,
                                 log=say)
    return finetune_evaluation(encoder, splits, cfg.train, cfg.optim, seed=cfg.seed, dtype=dtype,
                               val_every=cfg.eval.val_every, metrics=metrics, state=state)


def final_epoch(cfg: FinetuneConfig) -> int:
    return {"finetune": cfg.train.epochs, "linear": cfg.probe.epochs}.get(cfg.eval.mode, 0)


if __name__ == "__main__":
    run_cli(main)
