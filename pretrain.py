"""SimCLR pretraining. Run: python pretrain.py [--config FILE] [key=value ...]

Without --config the defaults are the SimCLR CIFAR-10 ResNet-18 recipe (configs/schema.py). One step:
uint8 batch on the device -> two augmented views -> encoder + head -> NT-Xent -> optimizer. The run directory
<run.dir>/<run.name>/ gets config.yaml, metrics.jsonl, checkpoints/last.pt, encoder.pt and summary.json.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from configs.load import load_config, to_yaml
from configs.schema import PretrainConfig
from core import dist
from core.device import resolve_device, resolve_precision
from core.errors import Collapsed, Stopped, UserError
from core.files import write_json
from data import EpochSampler, seeded_generator
from rundir.checkpoint import ENCODER_FILE, sha256_of
from rundir.cli import run_cli
from rundir.preemption import StopRequest
from training.pretraining import (Interval, StepContext, build_augment, build_model, build_optimizer, check_config,
                                collapse_summary, final_knn, finish_wandb, linear_probe_at_end, load_splits,
                                log_evaluation, log_interval, log_view_pairs, monitor_metrics,
                                online_classifier_results, open_records, progress, save_pictures, stopped_message,
                                train_step)
from training.resume import (encoder_record, find_resume_state, restore, resumed_config, save_checkpoint,
                           save_encoder, schedule_segments)
from rundir.lock import hold_run_dir
from rundir.tracking import decide_wandb_mode, git_sha, keep_wandb_out


def main(argv: Sequence[str]) -> dict:
    """Pretrain as the command line says; SIGTERM, SIGUSR1 and SIGINT stop it after a checkpoint at that step."""
    with StopRequest() as stop, contextlib.ExitStack() as held:
        return pretrain(argv, stop, held)


def pretrain(argv: Sequence[str], stop: StopRequest, held: contextlib.ExitStack) -> dict:
    # ---------------------------------------------------------------- config
    cfg = load_config(argv, PretrainConfig, prog="pretrain.py")
    keep_wandb_out(cfg.wandb.mode)
    device = dist.init_from_env(resolve_device(cfg.device), cfg.run.backend)  # torchrun: cuda:LOCAL_RANK
    dtype = resolve_precision(cfg.train.precision, device)
    check_config(cfg)
    run_dir = Path(cfg.run.dir).expanduser() / (cfg.run.name or f"{cfg.model.arch}-{cfg.data.name}-s{cfg.seed}")
    held.enter_context(hold_run_dir(run_dir))  # one writer: a second identical job stops here
    resume, resume_path = find_resume_state(cfg, run_dir)  # validated before anything is written
    if resume is not None:
        cfg = resumed_config(cfg, resume, resume_path)  # the checkpoint's schedule, or a finished run extended
    wandb_cfg = decide_wandb_mode(cfg.wandb)  # online | offline in seconds, before any data is loaded
    dist.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    if dist.is_main():
        print(to_yaml(cfg), flush=True)

    # ---------------------------------------------------------------- data: uint8 tensors resident on the device
    splits, train_images = load_splits(cfg, device)  # train_images: the labeled train (+ unlabeled) images
    train_labels = splits.train_labels  # the online classifier's and SupCon's (both refuse data.unlabeled)
    needs_labels = cfg.eval.online_linear or cfg.loss.name == "supcon"
    try:
        sampler = EpochSampler(len(train_images), cfg.train.batch_size, cfg.seed, dist.rank(), dist.world_size())
    except ValueError as err:
        raise UserError(f"train.batch_size={cfg.train.batch_size}: {err}") from None
    if dist.is_main():
        print(f"data: {len(train_images)} train / {len(splits.val_labels)} val images {tuple(train_images.shape[1:])} "
              f"on {device}, {sampler.steps_per_epoch} steps per epoch, {dist.world_size()} process(es)", flush=True)

    # ---------------------------------------------------------------- model, augmentation, optimizer
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device, dtype, num_classes=splits.num_classes if cfg.eval.online_linear else None,
                        image_size=train_images.shape[-1])
    augment = build_augment(cfg, splits, train_images.shape[-1])
    optimizer, schedule = build_optimizer(cfg, model, sampler.steps_per_epoch)
    if cfg.train.compile and device.type == "cpu":
        print("note: train.compile on CPU spends many minutes in Inductor's C++ compilation (over 8 min for a narrow "
              "ResNet-18 on 2 cores); it is meant for CUDA", file=sys.stderr, flush=True)
    ctx = StepContext(dist.wrap_ddp(model, device), optimizer, augment, device, dtype,  # checkpoints hold `model`
                      micro_batch=cfg.train.micro_batch, simclr=model)
    if cfg.train.compile:
        ctx.model = torch.compile(ctx.model)
        augment.compile()
    start_epoch, step, best_knn, stop_agreed = 0, 0, None, False
    if resume is not None:
        start_epoch, step, best_knn = restore(resume, model, optimizer)
        if dist.is_main():
            print(f"resume: from epoch {start_epoch}, step {step} ({resume_path})", flush=True)

    # ---------------------------------------------------------------- run directory
    run = open_records(cfg, run_dir, wandb_cfg, resume, sampler.steps_per_epoch, device)
    run.encoder = encoder_record(cfg, splits)
    run.metrics.truncate_after(step if resume is not None else -1)
    monitor = partial(monitor_metrics, model, splits, cfg, dtype)
    if run.wandb_run is not None and step == 0:
        log_view_pairs(run.wandb_run, augment, train_images[sampler.permutation(0)[:16].to(device)], cfg.seed)
    if cfg.eval.knn_every and step == 0:
        best_knn = log_evaluation(run, step, 0, monitor()).get("knn/top1")

    # ---------------------------------------------------------------- train
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        interval, batches = Interval(device), progress(sampler, epoch, step, device)
        for idx in batches:
            if stop_agreed or (stop.requested and dist.world_size() == 1):  # preempted: save this step, leave
                save_checkpoint(run, model, optimizer, step, epoch, best_knn)
                raise Stopped(stopped_message(stop, step, run), 128 + (stop.signum or signal.SIGTERM))
            lr = schedule(step)
            out = train_step(ctx, train_images[idx], seeded_generator(device, "augment", cfg.seed, step), lr,
                             labels=train_labels[idx] if needs_labels else None)
            interval.add(out)
            step += 1
            if step % cfg.train.log_every == 0 or step % sampler.steps_per_epoch == 0:  # the only host syncs
                stop_agreed = log_interval(run, interval, out, model, step, lr, stop.requested, batches)
        done = epoch + 1
        if cfg.eval.knn_every and (done % cfg.eval.knn_every == 0 or done == cfg.train.epochs):
            top1 = log_evaluation(run, step, done, monitor()).get("knn/top1")
            if top1 is not None:
                best_knn = top1 if best_knn is None else max(best_knn, top1)
        if done % cfg.run.ckpt_every == 0 or done == cfg.train.epochs:
            save_checkpoint(run, model, optimizer, step, done, best_knn)

    # ---------------------------------------------------------------- finish
    summary = {"status": "finished", "step": step, "epoch": cfg.train.epochs, "git_sha": git_sha(),
               "schedule_segments": schedule_segments(cfg.train), **final_knn(run.metrics),
               **collapse_summary(run.metrics, cfg.train.epochs, cfg.model.proj_dim)}
    if summary.get("collapsed"):  # a result, like divergence: recorded, its encoder kept, a distinct exit status
        summary["status"] = "collapsed"
    if best_knn is not None:
        summary["knn/best_top1"] = best_knn
    if cfg.eval.online_linear:  # solo-learn's protocol: the classifier trained beside pretraining, scored once
        summary.update(online_classifier_results(model, splits, dtype))
    if dist.is_main():
        save_encoder(run_dir / ENCODER_FILE, model, cfg, splits)
        summary["encoder_sha256"] = sha256_of(run_dir / ENCODER_FILE)  # what evaluations name as their checkpoint
        if cfg.eval.linear_at_end:
            summary.update(linear_probe_at_end(cfg, model.encoder, splits, dtype, run_dir))
        write_json(run_dir / "summary.json", summary)
        if cfg.eval.plots:
            save_pictures(run, model.encoder, splits, dtype)
        if run.wandb_run is not None:
            finish_wandb(run.wandb_run, model.encoder, splits, dtype, run_dir, summary, step, cfg.train.epochs,
                         cfg.seed)
        print(f"done: {run_dir} | " + " | ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    dist.barrier()
    dist.shutdown()
    if summary["status"] == "collapsed":
        raise Collapsed(f"the embeddings collapsed (over the last epoch train/erank {summary['train/erank']}, "
                        f"train/neg_cos {summary['train/neg_cos']}); {run_dir / 'summary.json'} records it and "
                        f"{ENCODER_FILE} is kept for inspection. Often a learning rate that is too high")
    return summary


if __name__ == "__main__":
    run_cli(main)
