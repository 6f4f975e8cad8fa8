"""Checkpoint files: safe loading (tensors and plain values only), strict state loading, encoders, hashes."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from augment import NORMALIZATIONS
from core.errors import UserError
from models import create_encoder, projection_head


CHECKPOINT_DIR = "checkpoints"  # <run dir>/checkpoints/last.pt: what a run continues from
ENCODER_FILE = "encoder.pt"  # <run dir>/encoder.pt: what evaluations read
CLASSIFIER_FILE = "classifier.pt"  # <evaluation run dir>/classifier.pt: encoder + trained head (export, explain)


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run directory keeps the checkpoint it continues from."""
    return Path(run_dir) / CHECKPOINT_DIR / "last.pt"


def load_file(path: Path, what: str = "checkpoint") -> dict:
    """Read a file written by :func:`atomic_save`; unreadable or foreign files are a UserError.

    ``weights_only=True``: only tensors and plain containers and scalars are unpickled, so a crafted file (an
    object whose ``__reduce__`` runs a command) is refused before anything in it runs. Checkpoints and encoders are
    shared between people and downloaded from W&B: they are data, never code.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors: not a checkpoint, or one that wants to run code
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        if culprit:  # weights_only refused a function or class the file asks to call
            raise UserError(f"{str(path)!r} holds more than tensors and plain values (it names {culprit.group(1)}), "
                            "so it was not loaded: a checkpoint from elsewhere must never run code") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise UserError(f"{str(path)!r} is not a readable {what}: "
                        f"{reason.group(1) if reason else f'{type(err).__name__}: {err}'}") from None
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} is not a {what} (holds {type(state).__name__})")
    return state


def load_strict(module: nn.Module, state_dict: dict, what: str = "checkpoint") -> None:
    """load_state_dict(strict=True) whose failure names the missing and unexpected keys in one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch in", mismatched))
        parts = [f"{label} {_few(keys)}" for label, keys in problems if keys]
        raise UserError(f"{what} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


@dataclass
class EncoderFile:
    """A pretrained encoder read from an ``encoder.pt`` or a pretraining ``checkpoints/last.pt``."""

    state: dict  # the encoder's state dict, no prefixes
    arch: str
    width: Optional[int]
    path: Path  # the file actually read
    run_name: str  # the pretraining run directory's name (for default evaluation names)
    normalize: str = "cifar"  # the input normalization it was trained with (aug.normalize; older files: cifar)
    image_size: int = 32  # pixels per side it was trained at (older files: 32)
    stem: str = "auto"  # a ResNet's stem (older files: auto, which is the CIFAR stem at 32)
    mean: Optional[Sequence[float]] = None  # its input normalization's statistics; None: the named constants
    std: Optional[Sequence[float]] = None
    classes: Optional[list] = None  # the pretraining dataset's classes, where recorded
    head: Optional[dict] = None  # the projection head's state dict (eval.features=headK); None: not recorded
    head_arch: Optional[dict] = None  # keyword arguments of projection_head() but in_dim (see head_arch())

    def statistics(self) -> tuple:
        """(mean, std) the encoder's inputs are normalized with (pixels in [0, 1])."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"{str(self.path)!r} names an unknown input normalization {self.normalize!r}")
        return NORMALIZATIONS[self.normalize]

    def build(self) -> nn.Module:
        """The architecture it holds weights for, randomly initialized (load ``state`` strictly into it)."""
        return create_encoder(self.arch, self.width, self.image_size, self.stem)

    def build_head(self, in_dim: int) -> nn.Sequential:
        """The pretrained projection head with its weights, on the CPU; a UserError where none was recorded."""
        if self.head is None or self.head_arch is None:
            raise UserError(f"{str(self.path)!r} holds no projection head (encoder.pt files of earlier versions kept "
                            "the encoder only): use the run's checkpoints/last.pt, or eval.features=encoder")
        head = head_from_arch(in_dim, self.head_arch)
        load_strict(head, self.head, f"the projection head of {str(self.path)!r}")
        return head


def head_from_arch(in_dim: int, recorded: dict) -> nn.Sequential:
    """A projection head with fresh weights, built from a recorded head_arch() (hidden and out dims of None: in_dim)."""
    arch = dict(recorded)
    return projection_head(in_dim, arch.pop("hidden_dim") or in_dim, arch.pop("out_dim") or in_dim, **arch)


def head_arch(model_cfg: dict) -> dict:
    """What rebuilds a pretraining run's projection head from its config's ``model`` section: projection_head()'s
    keyword arguments but in_dim, the encoder's feature dimension (hidden_dim None: the same)."""
    return {"num_layers": model_cfg["proj_layers"], "hidden_dim": model_cfg.get("proj_hidden_dim"),
            "out_dim": model_cfg["proj_dim"], "hidden_bn": model_cfg.get("proj_bn", True),
            "out_bn": model_cfg.get("proj_out_bn", False)}


def read_encoder(spec: str) -> EncoderFile:
    """Resolve ``spec`` (a pretraining run directory, its checkpoints/last.pt, or an encoder.pt) and read it."""
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = [path / ENCODER_FILE, last_checkpoint(path)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"checkpoint directory {spec!r} holds neither encoder.pt nor checkpoints/last.pt")
        path = found
    return encoder_from_state(load_file(path), path)


def encoder_from_state(state: dict, path: Path) -> EncoderFile:
    """The encoder inside a loaded encoder.pt, classifier.pt or pretraining checkpoint; non-finite weights refused."""
    if "encoder" in state and "arch" in state:  # encoder.pt (or classifier.pt)
        encoder_state, arch = state["encoder"], state["arch"]
        normalize = state.get("normalize", "cifar")
        head, head_record = state.get("head"), state.get("head_arch")
        run_dir = path.parent
    elif "model" in state and "config" in state:  # a pretraining checkpoint: the SimCLR module's state
        encoder_state = _prefixed(state["model"], "encoder.")
        model = state["config"]["model"]
        arch = state.get("arch") or {"arch": model["arch"], "width": model.get("width")}  # older: no "arch"
        normalize = state["config"].get("aug", {}).get("normalize", "cifar")
        head, head_record = _prefixed(state["model"], "head."), head_arch(model)
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    else:
        raise UserError(f"{str(path)!r} is neither an encoder.pt nor a pretraining checkpoint "
                        f"(keys: {', '.join(sorted(map(str, state))[:6])})")
    if not encoder_state:
        raise UserError(f"{str(path)!r} holds no encoder weights")
    refuse_non_finite(encoder_state, "encoder", path)
    return EncoderFile(encoder_state, arch["arch"], arch.get("width"), path, run_dir.name, normalize,
                       int(arch.get("image_size", 32)), arch.get("stem", "auto"), state.get("mean"), state.get("std"),
                       state.get("classes"), head, head_record)


def _prefixed(state: dict, prefix: str) -> dict:
    """The entries of a state dict under ``prefix``, with it stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def refuse_non_finite(state: dict, what: str, path: Path, consequence: str = "it is not used") -> None:
    """A UserError naming the tensors of ``state`` that hold NaN or inf: a diverged run's weights, which evaluating,
    exporting or explaining would turn into chance-level results presented as real ones."""
    broken = [k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point()
              and not bool(t.isfinite().all())]
    if broken:
        raise UserError(f"{str(path)!r} holds non-finite {what} weights (NaN or inf in {', '.join(broken[:3])}"
                        f"{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}); {consequence}")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def classifier_state(encoder: nn.Module, head: nn.Linear, *, arch: dict, normalize: str, mean: Sequence[float],
                     std: Sequence[float], classes: list[str], **provenance) -> dict:
    """What classifier.pt holds: an encoder.pt (``encoder``, ``arch`` for ``create_encoder(**arch)``, the input
    normalization; so evaluations can start from it too) plus the trained ``head`` (weight [C, d], bias [C], on raw
    encoder features) and the class names."""
    return {"encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, "arch": dict(arch),
            "normalize": normalize, "mean": list(mean), "std": list(std),
            "head": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "classes": list(classes),
            **provenance}


@dataclass
class ClassifierFile:
    """An evaluation's classifier.pt: the encoder (as :class:`EncoderFile`), the head and the class names."""

    encoder: EncoderFile
    head: dict  # {"weight": [C, d], "bias": [C]}
    classes: list[str]


def read_classifier(spec: str) -> ClassifierFile:
    """Read an evaluation run directory's classifier.pt (or the file itself)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{spec!r} does not exist")
    path = path / CLASSIFIER_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{spec!r} holds no {CLASSIFIER_FILE}: only linear and finetune evaluations write one "
                        "(a kNN evaluation trains no head)")
    state = load_file(path, "classifier")
    if not isinstance(state.get("head"), dict) or "classes" not in state:
        raise UserError(f"{str(path)!r} is not a classifier.pt (no head or classes)")
    if state.get("feature_layers"):
        raise UserError(f"{str(path)!r} was fine-tuned from projection head layers (eval.features="
                        f"{state.get('features', 'headK')}): export and explain take classifiers on the encoder's "
                        "features; it serves as a teacher (finetune.py eval.mode=distill teacher=...)")
    encoder = encoder_from_state(state, path)
    refuse_non_finite(state["head"], "classifier head", path)
    return ClassifierFile(encoder, state["head"], list(state["classes"]))


def read_trained(spec: str) -> tuple[EncoderFile, Optional[ClassifierFile]]:
    """What a run directory or file holds for deployment: (encoder, classifier) from an evaluation's classifier.pt,
    (encoder, None) from a pretraining run, its encoder.pt or checkpoints/last.pt."""
    path = Path(spec).expanduser()
    if (path.is_dir() and (path / CLASSIFIER_FILE).is_file()) or path.name == CLASSIFIER_FILE:
        classifier = read_classifier(spec)
        return classifier.encoder, classifier
    if path.is_dir() and (path / "results.json").is_file():
        raise UserError(f"evaluation run {spec!r} holds no {CLASSIFIER_FILE}: only linear and finetune evaluations "
                        "(from this version on) write one; a kNN evaluation trains no head")
    return read_encoder(spec), None
