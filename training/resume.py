"""Pretraining checkpoints and resuming: what is saved (atomically, by rank 0), what a resumed run may change, and the
schedule of a finished run extended to more epochs.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from configs.load import from_dict, recipe_changes, to_dict
from configs.schema import PretrainConfig
from core import dist
from core.errors import UserError
from core.files import atomic_save
from rundir.checkpoint import ENCODER_FILE, head_arch, last_checkpoint, load_file, load_strict, refuse_non_finite
from training.pretraining import RunRecords
from rundir.tracking import git_sha
from evaluation.evaluate import LabeledSplits
from models import SimCLR, is_vit, resnet_stem


def save_checkpoint(run: RunRecords, model: SimCLR, optimizer: torch.optim.Optimizer, step: int, epoch: int,
                    best_knn: Optional[float]) -> None:
    """Everything needed to continue exactly, from the unwrapped module; written atomically by rank 0. ``epoch``
    counts completed epochs; ``step`` may lie inside the next one (a checkpoint written on a stop signal)."""
    if dist.is_main():
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                     "config": to_dict(run.cfg), "best_knn": best_knn, "torch_rng": torch.get_rng_state(),
                     "git_sha": git_sha(), "wandb_run_id": run.wandb_run.id if run.wandb_run else None,
                     "elapsed_s": run.elapsed(),
                     **run.encoder}, run.checkpoint)
    dist.barrier()  # no rank runs ahead of a checkpoint that a restart would need


def encoder_record(cfg: PretrainConfig, splits: LabeledSplits) -> dict:
    """What rebuilds and feeds the encoder, kept in encoder.pt and every checkpoint: ``arch`` for
    ``create_encoder(**arch)`` (architecture, width, image size, the resolved ResNet stem), the input normalization
    ``mean`` / ``std`` (per channel, pixels in [0, 1]) with its name (aug.normalize), and the class names."""
    size = int(splits.train_images.shape[-1])
    arch = {"arch": cfg.model.arch, "width": cfg.model.width, "image_size": size}
    if not is_vit(cfg.model.arch):
        arch["stem"] = resnet_stem(size, cfg.model.stem)
    return {"arch": arch, "normalize": cfg.aug.normalize, "mean": list(splits.mean), "std": list(splits.std),
            "classes": list(splits.classes)}


def save_encoder(path: Path, model: SimCLR, cfg: PretrainConfig, splits: LabeledSplits) -> None:
    """Backbone weights plus :func:`encoder_record`: ``create_encoder(**file["arch"])`` rebuilds it. The projection
    head comes too (``head``, and ``head_arch`` to rebuild it), for evaluations of its layers (eval.features)."""
    config = to_dict(cfg)
    atomic_save({"encoder": model.encoder.state_dict(), **encoder_record(cfg, splits),
                 "feature_dim": model.encoder.feature_dim, "head": model.head.state_dict(),
                 "head_arch": head_arch(config["model"]), "config": config, "git_sha": git_sha()}, path)


def find_resume_state(cfg: PretrainConfig, run_dir: Path) -> tuple[Optional[dict], Optional[Path]]:
    """(the checkpoint to continue from, its path) per run.resume (auto | never | PATH), checked against this
    config; (None, None) to start afresh."""
    last = last_checkpoint(run_dir)
    if cfg.run.resume == "never":
        if last.exists() or (run_dir / "metrics.jsonl").exists():
            raise UserError(f"run directory {str(run_dir)!r} already holds a run and run.resume=never; "
                            "choose another run.name or use run.resume=auto")
        return None, None
    path = last if cfg.run.resume == "auto" else Path(cfg.run.resume).expanduser()
    if cfg.run.resume == "auto" and not path.is_file():
        if (run_dir / ENCODER_FILE).is_file() or (run_dir / "summary.json").is_file():
            raise UserError(f"run directory {str(run_dir)!r} holds a finished run (encoder.pt / summary.json) but no "
                            "checkpoints/last.pt to continue from; it is not trained over: choose another run.name")
        return None, None
    state = load_file(path)
    if "model" not in state or "config" not in state:
        raise UserError(f"{str(path)!r} is not a pretraining checkpoint (no model/config)")
    refuse_non_finite(state["model"], "model", path, "a run cannot continue from it: resume from an earlier checkpoint "
                      "(run.resume=PATH) or start a new run with another run.name")
    changed = recipe_changes(state["config"], cfg, PretrainConfig,
                             also_allowed=("train.epochs", "train.schedule_restarts"))  # resumed_config checks them
    if changed:
        raise UserError(f"cannot resume {str(path)!r}: it was trained with another recipe ({'; '.join(changed)}); "
                        "only logging, run.*, wandb.*, device and data paths may change on resume (train.epochs only "
                        "to extend a finished run). Start a new run with another run.name")
    return state, path


def resumed_config(cfg: PretrainConfig, state: dict, path: Path) -> PretrainConfig:
    """The config a resumed run continues with: the checkpoint's lr-schedule restarts, plus one at the old end when a
    finished run is extended to more epochs (a new phase: warm-up + cosine over the added epochs). A changed
    train.epochs of an unfinished run, a shortened finished run, or other restarts than the checkpoint's are refused:
    each would rewrite the schedule the run has been following."""
    saved = from_dict(state["config"], PretrainConfig).train
    old, new, restarts = saved.epochs, cfg.train.epochs, list(saved.schedule_restarts)
    if cfg.train.schedule_restarts and list(cfg.train.schedule_restarts) != restarts:
        raise UserError(f"cannot resume {str(path)!r}: train.schedule_restarts={list(cfg.train.schedule_restarts)} "
                        f"differs from the checkpoint's {restarts}; leave it unset on resume")
    if new != old and state["epoch"] < old:
        raise UserError(f"cannot resume {str(path)!r} with train.epochs={new}: it is at epoch {state['epoch']} of "
                        f"{old}, and its lr schedule would be recomputed mid-run. Continue with train.epochs={old}; "
                        f"once finished, train.epochs={new} extends it as a new phase (warm-up + cosine)")
    if new < old:
        raise UserError(f"cannot resume {str(path)!r} with train.epochs={new}: it finished {old} epochs; a run is "
                        "not shortened. Start a new run with another run.name")
    if new > old:
        restarts.append(old)
        if dist.is_main():
            print(f"extend: a finished {old}-epoch run continues to epoch {new}; its lr schedule starts again at "
                  f"epoch {old} (train.schedule_restarts={restarts})", flush=True)
    return replace(cfg, train=replace(cfg.train, schedule_restarts=restarts))


def schedule_segments(train) -> list[list[int]]:
    """[[start, end], ...] epochs of each lr-schedule segment: [[0, epochs]] for a run trained in one go."""
    bounds = [0, *train.schedule_restarts, train.epochs]
    return [[a, b] for a, b in zip(bounds, bounds[1:])]


def restore(state: dict, model: SimCLR, optimizer) -> tuple[int, int, Optional[float]]:
    """Weights, optimizer and RNG state of a checkpoint -> (completed epochs, step, best kNN). The step may lie inside
    the next epoch (a checkpoint written on a preemption signal)."""
    load_strict(model, state["model"], "checkpoint")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"], state["step"], state.get("best_knn")
