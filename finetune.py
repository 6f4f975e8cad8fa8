"""Evaluate an encoder on labeled data. Run: python finetune.py checkpoint=RUN_DIR [--config FILE] [key=value ...]

eval.mode: ``linear`` (frozen features, linear classifier, weight decay chosen on the validation split), ``finetune``
(whole network plus a new head on eval.label_fraction of the labels), ``knn`` (weighted kNN) or ``distill`` (a
student learns the predictions of ``teacher=``, a fine-tuning run, on all training images: SimCLRv2's recipe).
``checkpoint`` is a pretraining run directory, its checkpoints/last.pt or an encoder.pt; ``checkpoint=none`` starts
from random weights (model.arch needed): with eval.mode=finetune and eval.label_fraction=1.0 that is the supervised
baseline.
The run directory <run.dir>/<run.name>/ gets config.yaml, metrics.jsonl, results.json and confusion.png.
"""
from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch

from configs.load import load_config, to_dict, to_yaml
from configs.schema import FinetuneConfig
from core import dist
from core.files import atomic_save, write_text_atomic
from rundir.checkpoint import CLASSIFIER_FILE, EncoderFile, classifier_state, last_checkpoint, sha256_of
from core.errors import UserError
from rundir.cli import run_cli
from core.device import resolve_device, resolve_precision
from evaluation.distillation import DistillTargets, check_teacher, distill_loss, read_teacher
from evaluation.inputs import (TRAINED_MODES, check_config, encoder_arch, features_from, find_resume_state,
                               load_encoder, load_labeled_splits, read_source, say)
from evaluation.evaluate import EvalOutcome, LabeledSplits, knn_evaluation, linear_evaluation, results_record
from deploy.explain import explain_test_images, method_for
from deploy.export import Deployable
from evaluation.finetuning import FinetuneState, finetune_evaluation
from rundir.preemption import StopRequest
from rundir.lock import hold_run_dir
from rundir.tracking import (MetricsLog, decide_wandb_mode, git_sha, keep_wandb_out, run_facts, start_wandb,
                             write_results)

MODE_NAMES = {"linear": "linear probe", "finetune": "fine-tuning", "knn": "kNN", "distill": "distillation"}


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
    teacher = read_teacher(cfg.teacher, device) if cfg.eval.mode == "distill" else None
    run_dir = Path(cfg.run.dir).expanduser() / (cfg.run.name or default_run_name(cfg, source, arch))
    held.enter_context(hold_run_dir(run_dir))  # one writer: a second identical job stops here
    stop = held.enter_context(StopRequest()) if cfg.eval.mode in TRAINED_MODES else None  # others die and rerun
    if (run_dir / "results.json").exists():
        raise UserError(f"run directory {str(run_dir)!r} already holds an evaluation (results.json: finished); "
                        "choose another run.name or remove it")
    checkpoint_sha = sha256_of(source.path) if source else None
    resume = find_resume_state(cfg, run_dir, checkpoint_sha, teacher.sha256 if teacher else None)
    wandb_cfg = decide_wandb_mode(cfg.wandb)  # online | offline in seconds, before any data is loaded
    dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    say(to_yaml(cfg))

    # ---------------------------------------------------------------- data: labeled splits on the device
    splits, sizes = load_labeled_splits(cfg, source, device)  # at the encoder's input size
    if teacher is not None:
        check_teacher(teacher, splits, sizes["data/image_size"], cfg.data, cfg.eval.label_fraction)

    # ---------------------------------------------------------------- encoder: architecture from the checkpoint
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(arch, width, source, device, trainable=cfg.eval.mode in TRAINED_MODES,
                           image_size=sizes["data/image_size"])
    features = features_from(encoder, source, cfg.eval.features)  # the encoder, or it and head layers (headK)

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
                          {"config": to_dict(cfg), "checkpoint_sha256": checkpoint_sha,
                           "teacher_sha256": teacher.sha256 if teacher else None}, resume, stop)
    outcome = evaluate(cfg, features, splits, dtype, metrics, state, teacher)

    # ---------------------------------------------------------------- results
    record = results_record(outcome, splits, mode=cfg.eval.mode, label_fraction=cfg.eval.label_fraction,
                            features=cfg.eval.features, val_within_fraction=cfg.eval.val_share_of_labels > 0, **sizes,
                            checkpoint=str(source.path) if source else "none", checkpoint_sha256=checkpoint_sha,
                            model={"arch": arch, "width": width}, **teacher_record(cfg, teacher),
                            **labeled_record(splits),
                            git_sha=git_sha(), config=to_dict(cfg))
    arch_record = {"arch": arch, "width": width, "image_size": sizes["data/image_size"],
                   **({"stem": source.stem} if source else {})}
    classifier = None
    if outcome.head is not None and (features is encoder or cfg.eval.mode in TRAINED_MODES):
        # a frozen head-layer probe keeps no classifier.pt; a trained one keeps its head layers beside the encoder
        layers = {} if features is encoder else {"feature_layers": {
            "layers": int(cfg.eval.features[len("head"):]), "head_arch": source.head_arch,
            "state": {k: v.detach().cpu() for k, v in features.layers.state_dict().items()}}}
        classifier = classifier_state(encoder, outcome.head, arch=arch_record, classes=splits.classes,
                                      normalize=source.normalize if source else "auto", mean=list(splits.mean),
                                      std=list(splits.std), mode=cfg.eval.mode, features=cfg.eval.features,
                                      checkpoint_sha256=checkpoint_sha, **layers)
    if classifier is not None and dist.is_main():
        atomic_save(classifier, run_dir / CLASSIFIER_FILE)
        record["classifier_sha256"] = sha256_of(run_dir / CLASSIFIER_FILE)  # what a distillation names as teacher
    if cfg.eval.explain and dist.is_main():
        explain_grid(arch, Deployable(encoder, splits.mean, splits.std, outcome.head), splits, run_dir, wandb_run)
    publish(record, cfg, arch, splits.classes, run_dir, metrics, wandb_run,
            outcome.extra.get("finetune/steps", 0))
    dist.barrier()
    dist.shutdown()
    return record


def publish(record: dict, cfg: FinetuneConfig, arch: str, classes: list[str], run_dir: Path, metrics: MetricsLog,
            wandb_run, steps: int) -> None:
    """The headline numbers into metrics.jsonl; results.json (last: it marks the run finished), confusion.png and
    W&B by rank 0; the result line."""
    metrics.log(steps, final_epoch(cfg), {k: record[k] for k in ("val/top1", "test/top1", "test/top5", "ema/val_top1",
                                                                  "ema/test_top1") if record.get(k) is not None})
    if not dist.is_main():
        return
    path = write_results(run_dir, record, classes)
    if wandb_run is not None:
        wandb_run.log_evaluation(record, classes)
        wandb_run.summarize({k: v for k, v in record.items() if k != "config"})
        wandb_run.finish()
    val = f"{record['val/top1']:.2f}%" if record["val/top1"] is not None else "n/a (no validation split)"
    ema = f", EMA weights: test top-1 {record['ema/test_top1']:.2f}%" if "ema/test_top1" in record else ""
    images = (f"{record['data/train_images']} training images ({record['data/labeled_images']} labeled)"
              if "data/labeled_images" in record else f"{record['data/train_images']} labeled images")
    say(f"result: {MODE_NAMES[cfg.eval.mode]} of {arch} on {images}: "
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


def default_run_name(cfg: FinetuneConfig, source: Optional[EncoderFile], arch: str) -> str:
    """<pretraining run>-<mode>[-<percent>pct]-s<seed>, e.g. resnet18-cifar10-s0-finetune-1pct-s0."""
    base = source.run_name if source else f"scratch-{arch}"
    pct = f"-{cfg.eval.label_fraction * 100:g}pct" if cfg.eval.label_fraction < 1 else ""
    return f"{base}-{cfg.eval.mode}{pct}-s{cfg.seed}"


def labeled_record(splits: LabeledSplits) -> dict:
    """A distillation's count of labeled training images (the others are learnt from the teacher alone)."""
    return {} if splits.labeled is None else {"data/labeled_images": int(splits.labeled.sum())}


def teacher_record(cfg: FinetuneConfig, teacher) -> dict:
    """What results.json says of a distillation's teacher (nothing for other modes)."""
    if teacher is None:
        return {}
    return {"teacher": str(teacher.path.parent), "teacher_sha256": teacher.sha256,
            "teacher_features": teacher.record.get("config", {}).get("eval", {}).get("features", "encoder"),
            "teacher_model": teacher.record.get("model"), "distill/temperature": cfg.distill.temperature,
            "distill/label_weight": cfg.distill.label_weight}


def evaluate(cfg: FinetuneConfig, encoder: torch.nn.Module, splits: LabeledSplits, dtype: torch.dtype,
             metrics: MetricsLog, state: FinetuneState, teacher=None) -> EvalOutcome:
    if cfg.eval.mode == "knn":
        return knn_evaluation(encoder, splits, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                              vote=cfg.eval.knn_vote, dtype=dtype)
    if cfg.eval.mode == "linear":
        return linear_evaluation(encoder, splits, cfg.probe, seed=cfg.seed, dtype=dtype, augment=cfg.eval.augment,
                                 # refit on train + val only where val holds no label beyond the fraction
                                 refit_allowed=cfg.eval.label_fraction == 1 or cfg.eval.val_share_of_labels > 0,
                                 log=say)
    distilled = {} if teacher is None else {
        "targets_fn": DistillTargets(teacher, splits),
        "loss_fn": partial(distill_loss, temperature=cfg.distill.temperature, label_weight=cfg.distill.label_weight)}
    return finetune_evaluation(encoder, splits, cfg.train, cfg.optim, seed=cfg.seed, dtype=dtype,
                               val_every=cfg.eval.val_every, metrics=metrics, state=state, **distilled)


def final_epoch(cfg: FinetuneConfig) -> int:
    if cfg.eval.mode in TRAINED_MODES:
        return cfg.train.epochs
    return cfg.probe.epochs if cfg.eval.mode == "linear" else 0


if __name__ == "__main__":
    run_cli(main)
