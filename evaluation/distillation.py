"""Distillation (SimCLRv2 Sec. 2.2, eval.mode=distill): a student learns a fine-tuned teacher's softened predictions
on every training image, its labels unused (beyond an optional labeled term), then is scored like fine-tuning.

The teacher is an evaluation run's classifier.pt (the encoder, the head layers it was fine-tuned from, the linear
head), rebuilt here in eval mode without gradients; it sees the student's augmented views, re-normalized with its
own statistics. Its file is only read: the run records its SHA-256, and a resumed run checks it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from evaluation.evaluate import LabeledSplits
from models.heads import HeadFeatures, head_prefix
from rundir.checkpoint import CLASSIFIER_FILE, encoder_from_state, head_from_arch, load_file, load_strict, sha256_of

SPLIT_KEYS = ("name", "val_size", "train_limit", "split_seed")  # data.*: the teacher's validation split is ours


@dataclass
class Teacher:
    """A fine-tuned classifier, frozen: uint8-normalized views [B, 3, H, W] (its own normalization) -> logits [B, C]."""

    model: nn.Module
    mean: Sequence[float]
    std: Sequence[float]
    classes: list[str]
    image_size: int
    sha256: str  # of its classifier.pt
    path: Path
    record: dict  # its results.json


def read_teacher(spec: str, device: torch.device) -> Teacher:
    """The classifier.pt of the fine-tuning run ``spec`` (a run directory), rebuilt on ``device`` in eval mode with
    no gradients; a UserError where it is not a finished fine-tuning run with a classifier."""
    run_dir = Path(spec).expanduser()
    path = run_dir / CLASSIFIER_FILE
    if not run_dir.is_dir():
        raise UserError(f"teacher={spec!r} is not a run directory (a finished fine-tuning run)")
    if not path.is_file() or not (run_dir / "results.json").is_file():
        raise UserError(f"teacher={spec!r} holds no {CLASSIFIER_FILE} and results.json: the teacher must be a "
                        "finished eval.mode=finetune run (a kNN or head-layer linear probe keeps no classifier)")
    record = json.loads((run_dir / "results.json").read_text())
    if record.get("mode") not in ("finetune", "distill"):
        raise UserError(f"teacher={spec!r} is a {record.get('mode')} evaluation; distill from a fine-tuning run "
                        "(eval.mode=finetune), whose whole network was trained on the labels")
    state = load_file(path, "classifier")
    encoder_file = encoder_from_state(state, path)
    encoder = encoder_file.build()
    load_strict(encoder, encoder_file.state, f"the teacher's encoder in {str(path)!r}")
    features: nn.Module = encoder
    if state.get("feature_layers"):
        layers = state["feature_layers"]
        prefix = head_prefix(head_from_arch(encoder.feature_dim, layers["head_arch"]), int(layers["layers"]))
        load_strict(prefix, layers["state"], f"the teacher's head layers in {str(path)!r}")
        features = HeadFeatures(encoder, prefix)
    linear = nn.Linear(state["head"]["weight"].shape[1], state["head"]["weight"].shape[0])
    load_strict(linear, state["head"], f"the teacher's head in {str(path)!r}")
    model = nn.Sequential(features, linear).to(device).eval().requires_grad_(False)
    mean, std = encoder_file.statistics()
    return Teacher(model, mean, std, list(state["classes"]), encoder_file.image_size, sha256_of(path), path, record)


def check_teacher(teacher: Teacher, splits: LabeledSplits, image_size: int, data_cfg, label_fraction: float) -> None:
    """Refuse a teacher that cannot teach this student: other classes, another image size, another validation split
    (it would have trained on our validation images) or another label fraction."""
    if teacher.classes != list(splits.classes):
        raise UserError(f"teacher {str(teacher.path)!r} predicts other classes ({', '.join(teacher.classes[:4])}, "
                        f"...) than data.name={data_cfg.name} has ({', '.join(splits.classes[:4])}, ...)")
    if teacher.image_size != image_size:
        raise UserError(f"teacher {str(teacher.path)!r} takes {teacher.image_size}x{teacher.image_size} images, the "
                        f"student {image_size}x{image_size}; distill at the teacher's size (data.image_size)")
    data = (teacher.record.get("config") or {}).get("data", {})
    differ = [f"data.{k}={data.get(k)!r} there, {getattr(data_cfg, k)!r} here" for k in SPLIT_KEYS
              if k in data and data[k] != getattr(data_cfg, k)]
    if differ:
        raise UserError(f"teacher {str(teacher.path)!r} was fine-tuned on another split ({'; '.join(differ)}): its "
                        "training images may hold this run's validation images")
    if teacher.record.get("label_fraction") != label_fraction:
        raise UserError(f"teacher {str(teacher.path)!r} was fine-tuned on eval.label_fraction="
                        f"{teacher.record.get('label_fraction')}, this run says {label_fraction}: use the teacher's")


class DistillTargets:
    """What the student learns on one batch: (teacher logits [B, C], labels [B], labeled mask [B])."""

    def __init__(self, teacher: Teacher, splits: LabeledSplits) -> None:
        device = splits.train_labels.device
        view = dict(device=device, dtype=torch.float32)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t: the student's normalized views in the teacher's terms
        s_mean, s_std = (torch.tensor(v, **view).view(1, 3, 1, 1) for v in (splits.mean, splits.std))
        t_mean, t_std = (torch.tensor(v, **view).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
        self.scale, self.shift = s_std / t_std, (s_mean - t_mean) / t_std
        self.teacher, self.labels, self.labeled = teacher.model, splits.train_labels, splits.labeled

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> tuple:
        logits = self.teacher(x * self.scale + self.shift).float()
        return logits, self.labels[idx], self.labeled[idx]


def distill_loss(student_logits: torch.Tensor, targets: tuple, temperature: float,
                 label_weight: float = 0.0) -> torch.Tensor:
    """SimCLRv2's distillation loss (eq. 2): -sum_y P_T(y | x; T) log P_S(y | x; T), averaged over the batch, plus
    ``label_weight`` x the cross-entropy on the batch's labeled images (mean over them; 0 when it holds none).
    student_logits [B, C]; targets (teacher logits [B, C], labels [B], labeled mask [B] bool)."""
    teacher_logits, labels, labeled = targets
    student = student_logits.float()
    soft = F.softmax(teacher_logits.float() / temperature, dim=1)
    loss = -(soft * F.log_softmax(student / temperature, dim=1)).sum(1).mean()
    if label_weight > 0:
        per_image = F.cross_entropy(student, labels, reduction="none")
        loss = loss + label_weight * (per_image * labeled).sum() / labeled.sum().clamp(min=1)
    return loss
