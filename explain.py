"""Show what an evaluation's classifier looks at. Run: python explain.py checkpoint=EVAL_RUN_DIR [key=value ...]

Grad-CAM for ResNets (the trained head's score of the predicted class, on the last stage), the class token's
attention for ViTs (last block, averaged over heads), on a fixed class-balanced set of test images: a PNG grid of
image, heat map, overlay, predicted and true class, in the evaluation's run directory (<method>.png) and as W&B media.
finetune.py eval.explain=true makes the same grid at the end of an evaluation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from configs.load import load_config, to_dict
from configs.schema import ExplainConfig
from core.device import resolve_device
from core.errors import UserError
from data import load_source
from rundir.checkpoint import read_classifier
from rundir.cli import run_cli
from deploy.explain import explain_test_images, method_for
from deploy.export import build_deployable
from rundir.tracking import decide_wandb_mode, keep_wandb_out, start_wandb


def main(argv: Sequence[str]) -> dict:
    # ---------------------------------------------------------------- what to explain, where (all checks first)
    cfg = load_config(argv, ExplainConfig, prog="explain.py")
    keep_wandb_out(cfg.wandb.mode)
    if not cfg.checkpoint:
        raise UserError("checkpoint= is required: an evaluation run directory holding classifier.pt")
    classifier = read_classifier(cfg.checkpoint)
    arch = classifier.encoder.arch
    method = check_method(cfg.method, arch)
    run_dir = classifier.encoder.path.parent
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / f"{method}.png"
    if out.exists():
        raise UserError(f"{str(out)!r} already exists; choose another out= (it is not replaced)")
    if not out.parent.is_dir():
        raise UserError(f"the directory of out={str(out)!r} does not exist")
    device = resolve_device(cfg.device)
    wandb_cfg = decide_wandb_mode(cfg.wandb)

    # ---------------------------------------------------------------- the fixed test images, the classifier
    data = load_source(cfg.data.name, cfg.data.root, download=cfg.data.download, cache_dir=cfg.data.cache_dir)
    if not len(data.test_labels):
        raise UserError(f"data.root {cfg.data.root!r} has no test split to explain on")
    if list(data.classes) != classifier.classes:
        raise UserError(f"the classifier knows classes {classifier.classes[:4]}..., data.root has "
                        f"{list(data.classes)[:4]}...: not the data it was trained on")
    model = build_deployable(classifier.encoder, classifier.head).to(device)

    # ---------------------------------------------------------------- explain
    shown = explain_test_images(model, data.test_images, data.test_labels, classifier.classes,
                                arch=arch, run_name=run_dir.name, count=cfg.images, path=out)
    wandb_run = start_wandb(wandb_cfg, job_type="explain", config=to_dict(cfg), run_dir=run_dir)
    if wandb_run is not None:
        wandb_run.log_png(f"explain/{method}", out, shown["title"])
        wandb_run.finish()
    print(f"explained: {shown['title']}: {shown['top1']:.0f}% of them classified correctly; heat maps hold "
          f"{100 * shown['mass_in_top_quarter']:.0f}% of their mass in their top quarter of pixels -> {out}", flush=True)
    return shown


def check_method(method: str, arch: str) -> str:
    """The method to use; a UserError when it does not fit the architecture."""
    fitting = method_for(arch)
    if method not in ("auto", fitting):
        raise UserError(f"method={method} does not apply to {arch}: use method={fitting} "
                        f"({'ResNets' if fitting == 'gradcam' else 'ViTs'}) or method=auto")
    return fitting


if __name__ == "__main__":
    run_cli(main)
