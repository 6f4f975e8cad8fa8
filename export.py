"""Export an encoder or a classifier for deployment. Run: python export.py checkpoint=RUN_DIR format=FORMAT out=PATH

checkpoint: a pretraining run (exports its encoder: features [N, D]) or an evaluation run with a classifier.pt
(encoder + trained head: logits [N, C]). format: torchscript | onnx (dynamic batch) | onnx_int8 (statically quantized,
calibrated on training images) | safetensors (weights + the metadata that rebuilds the module). Every export takes
uint8 images [N, 3, S, S], RGB 0-255, and normalizes inside. After writing, the file is read back (torch.jit.load,
onnxruntime, or rebuilt from safetensors) and its outputs on check_images test images (class-balanced, seeded, at the
size the encoder was trained at, resized as the evaluation does) are compared with the eager model's: beyond
`tolerance` (onnx_int8: a test top-1 drop beyond max_top1_drop, or an encoder's features below min_feature_cosine)
nothing is written. <out>.json records the contract, the SHA-256 and the measured agreement;
check_only=true checks an existing export again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from configs.load import load_config
from configs.schema import ExportConfig
from core.errors import UserError
from core.files import write_json
from data import balanced_subset, load_source, resize_images
from rundir.checkpoint import read_trained, sha256_of
from rundir.cli import run_cli
from deploy.export import (build_deployable, check_requirements, int8_agreement, load_export, max_relative_error,
                           metadata, read_metadata, write_export)


def main(argv: Sequence[str]) -> dict:
    # ---------------------------------------------------------------- what to export, where (all checks first)
    cfg = load_config(argv, ExportConfig, prog="export.py")
    if not cfg.checkpoint or not cfg.out:
        raise UserError("checkpoint= and out= are required, e.g. python export.py checkpoint=runs/NAME format=onnx "
                        "out=model.onnx")
    out = Path(cfg.out).expanduser()
    if cfg.check_only != out.exists():
        raise UserError(f"out={cfg.out!r} does not exist: nothing to check" if cfg.check_only else
                        f"out={cfg.out!r} already exists; choose another path or remove it (it is not overwritten)")
    if not out.parent.is_dir():
        raise UserError(f"the directory of out={cfg.out!r} does not exist")
    check_requirements(cfg.format)
    encoder_file, classifier = read_trained(cfg.checkpoint)
    classes = classifier.classes if classifier else None
    model = build_deployable(encoder_file, classifier.head if classifier else None)

    # ---------------------------------------------------------------- the images it is checked on
    data = load_source(cfg.data.name, cfg.data.root, download=cfg.data.download, cache_dir=cfg.data.cache_dir)
    if not len(data.test_labels):
        raise UserError(f"data.root {cfg.data.root!r} has no test split to check the export on")
    images, labels = check_images(data.test_images, data.test_labels, cfg.check_images, encoder_file.image_size)

    # ---------------------------------------------------------------- write (to a temporary name), read back, check
    if cfg.check_only:
        return check_existing(out, cfg, model, images, labels)
    meta = metadata(encoder_file, classes, cfg.format, image_size=images.shape[-1])
    calibration = calibration_labels = None
    if cfg.format == "onnx_int8":
        calibration, calibration_labels = check_images(data.train_images, data.train_labels,
                                                       cfg.calibration_images, encoder_file.image_size)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        write_export(model, cfg.format, tmp, images[:2], meta, calibration)
        measured, text = verify(cfg, load_export(tmp, cfg.format), model, images, labels,
                                f"the {cfg.format} export", "; nothing written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    record = {**meta, "sha256": sha256_of(out), "checked_images": len(images), **measured,
              "checked_per_class": per_class(labels, len(data.classes)), "data": f"{cfg.data.name} {cfg.data.root}"}
    if calibration is not None:
        record["calibration_images"] = len(calibration)
        record["calibration_per_class"] = per_class(calibration_labels, len(data.classes))
    write_json(record_path(out), record)
    print(f"exported: {meta['kind']} {meta['arch']} -> {out} ({cfg.format}, {out.stat().st_size / 1e6:.2f} MB); "
          f"input {meta['input']}; output {meta['output']}; checked on {len(images)} test images: {text}", flush=True)
    return record


def check_images(images: torch.Tensor, labels: torch.Tensor, count: int, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of a split, class-balanced and seeded (the same ones every time), as uint8 [n, 3, size, size]
    with their labels [n]: an image folder's first images would all be one class."""
    chosen = balanced_subset(labels.cpu(), count, seed=0)
    picked = images[chosen.to(images.device)].cpu()
    return (picked if picked.shape[-1] == size else resize_images(picked, size)), labels.cpu()[chosen]


def per_class(labels: torch.Tensor, num_classes: int) -> list[int]:
    """How many of ``labels`` [n] fall in each class: what the record shows of a check's balance."""
    return torch.bincount(labels, minlength=num_classes).tolist()


def verify(cfg: ExportConfig, run, model, images, labels, what: str, consequence: str = "") -> tuple[dict, str]:
    """The export's outputs against the eager model's: (what was measured, a line saying it), or a UserError.
    fp32 formats: the max relative error within `tolerance`; onnx_int8: the classifier's test top-1 drop within
    `max_top1_drop` points, or the encoder's mean feature cosine at least `min_feature_cosine`."""
    if cfg.format != "onnx_int8":
        error = max_relative_error(run, model, images)
        if not error <= cfg.tolerance:
            raise UserError(f"{what} differs from the eager model by {error:.2e} (relative, on {len(images)} test "
                            f"images) > tolerance {cfg.tolerance:g}{consequence}")
        return {"max_relative_error": error, "tolerance": cfg.tolerance}, \
            f"max relative error {error:.2e} <= {cfg.tolerance:g}"
    measured = int8_agreement(run, model, images, labels)
    if "top1_drop" in measured:
        if not measured["top1_drop"] <= cfg.max_top1_drop:
            raise UserError(f"{what} loses {measured['top1_drop']:.2f} points of test top-1 against the eager model "
                            f"({measured['top1_int8']:.2f}% vs {measured['top1_fp32']:.2f}% on {len(images)} images) "
                            f"> max_top1_drop {cfg.max_top1_drop:g}{consequence}")
        return {**measured, "max_top1_drop": cfg.max_top1_drop}, (
            f"top-1 {measured['top1_int8']:.2f}% vs {measured['top1_fp32']:.2f}% eager (drop "
            f"{measured['top1_drop']:.2f} <= {cfg.max_top1_drop:g}), predictions agree on "
            f"{measured['prediction_agreement']:.1f}%")
    if not measured["feature_cosine_mean"] >= cfg.min_feature_cosine:
        raise UserError(f"{what}'s features have a mean cosine of {measured['feature_cosine_mean']:.4f} to the eager "
                        f"model's < min_feature_cosine {cfg.min_feature_cosine:g}{consequence}")
    return {**measured, "min_feature_cosine": cfg.min_feature_cosine}, \
        f"mean feature cosine {measured['feature_cosine_mean']:.4f} >= {cfg.min_feature_cosine:g}"


def check_existing(out: Path, cfg: ExportConfig, model, images, labels) -> dict:
    """check_only: the file's SHA-256 against its <out>.json record, then its outputs against the eager model."""
    record = record_path(out)
    if record.is_file():
        recorded = json.loads(record.read_text()).get("sha256")
        if recorded and recorded != sha256_of(out):
            raise UserError(f"{str(out)!r} was changed or damaged since it was exported: its SHA-256 differs from "
                            f"the one in {record.name}")
    read_metadata_or_fail(out, cfg.format)
    measured, text = verify(cfg, load_export(out, cfg.format), model, images, labels,
                            f"{str(out)!r} (checkpoint={cfg.checkpoint})")
    print(f"checked: {out} ({cfg.format}) matches checkpoint={cfg.checkpoint} on {len(images)} test images: {text}",
          flush=True)
    return {**measured, "checked_images": len(images)}


def record_path(out: Path) -> Path:
    """<out>.json: the export's contract, SHA-256 and measured error."""
    return out.with_name(out.name + ".json")


def read_metadata_or_fail(out: Path, fmt: str) -> dict:
    try:
        return read_metadata(out, fmt)
    except Exception as err:  # a damaged file fails in its runtime's own way
        raise UserError(f"{str(out)!r} is not a readable {fmt} export of this project: {type(err).__name__}") from None


if __name__ == "__main__":
    run_cli(main)
