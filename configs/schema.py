"""The one typed configuration. Defaults are the SimCLR CIFAR-10 ResNet-18 recipe.

Every key here is part of the public contract (CLI overrides, config.yaml in each run, checkpoints).
Allowed values and ranges are declared next to the field (``CHOICES`` and ``RANGES``) and enforced by
``configs.load``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from core.names import ARCHS, EXPORT_FORMATS, LOSS_IMPLS, LOSSES, OPTIMIZERS


@dataclass
class DataConfig:
    """Where the images come from and how the training images are split."""

    # cifar10 | cifar100 (fine labels): torchvision's python copy | stl10: the binary copy (96x96, with 100,000
    # unlabeled images) | folder: image folders or an archive (train/, test/, optionally unlabeled/) | synthetic: tests
    name: str = "cifar10"
    # cifar10: a directory holding cifar-10-batches-py. folder: an image-folder directory or a .tar/.tar.gz/.tar.xz
    # archive of one (train/<class>/*, test/<class>/*). Kept outside the source tree.
    root: str = "~/.cache/simclr/cifar10"
    download: bool = True  # cifar10 only: fetch from the internet when root holds no copy
    cache_dir: str = "~/.cache/simclr/decoded"  # decoded uint8 arrays of folder/archive sources
    val_size: int = 5000  # images held out of train, class-balanced, for kNN monitoring and model selection
    # pretraining also trains on the unlabeled images (stl10's, a folder's unlabeled/); monitoring and every
    # evaluation use the labeled splits only
    unlabeled: bool = False
    # pixels per side of every image (and view); 0 = the dataset's own size. A folder of mixed sizes needs one: its
    # images are resized once at decode time (shorter side, then a centre crop)
    image_size: int = 0
    train_limit: int = 0  # cap on training images (class-balanced); 0 = all
    split_seed: int = 0  # fixes the validation split independently of `seed`, so runs share one val set


@dataclass
class ModelConfig:
    """The encoder and the projection head."""

    arch: str = "resnet18"  # ResNets with the CIFAR stem (3x3 conv, no max-pool); ViTs from timm, patch 4
    width: Optional[int] = None  # ResNet base width (64 = standard); None = the architecture's own
    # 2 = SimCLR v1 head, 3 = SimCLR v2 head, 1 = a linear projection, 0 = no head (the loss on the encoder's
    # features h; the other proj_* keys then have no effect)
    proj_layers: int = 2
    proj_hidden_dim: Optional[int] = None  # None = the encoder's feature dimension
    proj_dim: int = 128  # output dimension of the head: the space the loss compares views in
    proj_bn: bool = True  # batch norm after each hidden linear of the head (SimCLR); false: Linear-ReLU (dkobak)
    proj_out_bn: bool = False  # batch norm on the head's output too (lightly's cifar10 benchmark)
    # joint: batch norm over both views together | separate: per-view statistics, exactly what one forward pass per
    # view gives (dkobak, lightly), computed in one pass of both views (models/view_bn.py), so it costs no speed
    forward_views: str = "joint"
    sync_bn: bool = True  # global batch norm across processes (ResNets, world size > 1)
    stem: str = "auto"  # ResNets: cifar (3x3, no max-pool) | imagenet (7x7 stride 2 + max-pool) | auto: imagenet from 96 px


@dataclass
class LossConfig:
    """The contrastive loss over the views of a batch (docs/pretraining.md: which to use when)."""

    # ntxent: SimCLR (the views of one image are positives) | supcon: the views of every image of the same class are
    # positives (needs labels) | dcl: decoupled, positives leave the denominator | dclw: dcl weighted by dcl_sigma
    name: str = "ntxent"
    temperature: float = 0.5  # logits are cosine similarities / temperature
    dcl_sigma: float = 0.5  # dclw only: the positive term's weight 2 - exp(s / sigma) / its mean over positive pairs
    impl: str = "auto"  # reference: one logit matrix | fused: blockwise, O(N) memory | auto: the faster measured


@dataclass
class AugConfig:
    """The SimCLR view augmentation, run batched on the device."""

    crop: bool = True  # random resized crop (with min_scale); false: every view is the whole image (flip still applies)
    # multi-crop: K more views per image, small crops at local_size pixels, positives of every view of the image
    local_crops: int = 0
    local_size: int = 0  # pixels per side of the small views; 0 = half the image size
    local_min_scale: float = 0.05  # small crops: smallest area fraction of the image
    local_max_scale: float = 0.4  # small crops: largest area fraction
    strength: float = 0.5  # colour jitter strength s: brightness/contrast/saturation 0.8 s, hue 0.2 s
    min_scale: float = 0.08  # random resized crop: smallest area fraction
    jitter_prob: float = 0.8  # probability of the colour jitter
    gray_prob: float = 0.2  # probability of converting a view to grayscale
    blur_prob: float = 0.0  # off for CIFAR (paper B.9)
    solarize_prob: float = 0.0  # probability of solarizing a view (BYOL-style; off in SimCLR)
    # the encoder's input normalization: auto (per-channel mean and std of the training images in use, recorded in
    # encoder.pt) | cifar | imagenet (fixed constants) | none (pixels in [0, 1])
    normalize: str = "auto"


@dataclass
class TrainConfig:
    """Epochs, batch, precision and compilation of the training loop."""

    epochs: int = 1000  # passes over the training images
    batch_size: int = 512  # global: summed over all processes
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp64 (exactness checks)
    compile: bool = False  # torch.compile the training step (faster on GPUs after a minute of compiling)
    log_every: int = 50  # steps between reads of device-side metrics (each read is a host sync)
    # Images per chunk per process: batches larger than memory, exactly (every view keeps all 2B - 2 negatives; the
    # projections' gradients are cached and each chunk runs again with autograd: one extra forward). 0 = off.
    micro_batch: int = 0
    # Epochs at which the lr schedule starts again (warm-up, then cosine to the next restart or the end). pretrain.py
    # adds one when a finished run is extended (train.epochs raised on resume); every resume keeps the checkpoint's.
    schedule_restarts: List[int] = field(default_factory=list)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then cosine, per step)."""

    name: str = "lars"  # lars: SGD with layer-wise trust ratios (SimCLR) | sgd | adamw
    base_lr: float = 1.0  # effective lr = base_lr x global batch / 256
    weight_decay: float = 1e-6  # L2 on conv and linear weights (see decay_norm_bias for the rest)
    momentum: float = 0.9  # lars, sgd
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the effective lr, then cosine
    min_lr_ratio: float = 0.0  # cosine ends at min_lr_ratio x effective lr
    nesterov: bool = False  # sgd only
    lars_trust_coeff: float = 1e-3  # lars only: local lr = trust_coeff x |w| / |g| (solo-learn's CIFAR recipe: 0.02)
    lars_trust_clip: bool = False  # lars only: clip the local lr at the global one (LARC; solo-learn's clip_lr)
    decay_norm_bias: bool = False  # also decay (and LARS-adapt) biases, norm parameters and ViT tokens


@dataclass
class EvalConfig:
    """Monitoring during pretraining (kNN, online linear classifier) and the optional final probe."""

    knn_every: int = 10  # epochs between kNN evaluations on the validation split; 0 = off
    knn_k: int = 200  # neighbours that vote
    knn_temperature: float = 0.1  # weighted vote: each neighbour counts exp(cosine / T)
    knn_vote: str = "weighted"  # weighted (Wu et al. 2018, lightly) | majority (one vote per neighbour, dkobak)
    # Monitoring only: also score each kNN evaluation on the test split (lightly reports the maximum over epochs of
    # this). Optimistic; never a result on its own. Logged as knn_test/top1; summary knn_test/top1, knn_test/max_top1.
    knn_test_monitor: bool = False
    online_linear: bool = False  # a linear classifier trained beside pretraining on stop-gradient encoder features
    online_lr: float = 0.1  # its base lr (x global batch / 256), own parameter group: no weight decay, no LARS
    linear_at_end: bool = False  # run the linear probe (probe.*) on the final encoder; results.json in the run dir
    # At the end: curves.png (loss, kNN top-1, lr against epochs; kNN against seconds) and embedding.png (t-SNE of up
    # to 1,000 validation features, coloured by class) in the run directory, and as W&B media
    plots: bool = True


@dataclass
class ProbeConfig:
    """Linear probe on frozen features: one classifier per weight decay, trained together, chosen on val."""

    epochs: int = 100  # passes over the training features
    batch_size: int = 1024  # features per probe step
    lr: float = 0.1  # SGD with Nesterov momentum 0.9, cosine to 0, on standardized features
    wd_grid: List[float] = field(default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3, 1e-2])  # L2 on the weights
    refit_on_val: bool = True  # with label_fraction 1: refit the chosen classifier on train + val before test


@dataclass
class RunConfig:
    """The run directory, resumption, checkpoints and the distributed backend."""

    dir: str = "runs"  # parent of the run directory <run.dir>/<run.name>
    name: str = ""  # empty = <arch>-<data.name>-s<seed>
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    ckpt_every: int = 1  # epochs between checkpoints (also written at the end)
    backend: str = "auto"  # process group under torchrun: auto (NCCL on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class WandbConfig:
    """Weights & Biases tracking (offline-first: auto falls back to offline without a server)."""

    mode: str = "auto"  # auto: online when the server answers, else offline (sync later) | online | offline | disabled
    project: str = "simclr-cifar10"  # W&B project the run is filed under
    entity: Optional[str] = None  # W&B team or user; None = your default entity
    group: Optional[str] = None  # W&B group (e.g. one per table or sweep)
    name: Optional[str] = None  # W&B run name; None = run.name
    tags: List[str] = field(default_factory=list)  # W&B tags, e.g. [baseline,r18]
    notes: Optional[str] = None  # W&B run notes


@dataclass
class PretrainConfig:
    """Pretrain an encoder with SimCLR. Defaults are the paper's CIFAR-10 ResNet-18 recipe."""

    seed: int = 0  # initialization, augmentation and batch order; the validation split has its own (data.split_seed)
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EncoderConfig:
    """Which encoder to build: the checkpoint's unless starting from scratch (checkpoint=none)."""

    arch: Optional[str] = None  # None = the checkpoint's; required with checkpoint=none
    width: Optional[int] = None  # ResNets; None = the checkpoint's (or 64 from scratch)


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The fine-tuning loop (eval.mode=finetune; checkpoint=none with all labels is the supervised baseline) and its
    regularizers, each off by default."""

    # MixUp / CutMix on the device batch (torchvision.transforms.v2): mixing weight ~ Beta(alpha, alpha); 0 = off
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0  # CutMix: a box of area fraction 1 - lambda, lambda ~ Beta(alpha, alpha); 0 = off
    mix_prob: float = 1.0  # share of batches that are mixed, when mixup_alpha or cutmix_alpha is set
    cutmix_switch_prob: float = 0.5  # with both set: share of mixed batches that use CutMix instead of MixUp
    label_smoothing: float = 0.0  # F.cross_entropy's: targets (1 - e) one-hot + e / classes (also on mixed targets)
    grad_clip: float = 0.0  # clip the global gradient norm at this value; 0 = off (train/grad_norm is logged before)
    # exponential moving average of the weights (and batch-norm statistics), evaluated beside the raw weights as
    # ema/val_top1 and ema/test_top1: ema <- decay x ema + (1 - decay) x weights after every step; 0 = off
    ema_decay: float = 0.0


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Optimizer and learning-rate schedule of fine-tuning (linear warm-up, then cosine, per step)."""

    # ViTs: layer-wise lr decay (timm's param_groups_layer_decay): block i (from 0) of L gets lr x
    # layer_decay^(L - 1 - i), the patch embedding and tokens layer_decay^L, the last block and the head the full lr;
    # 1 = off
    layer_decay: float = 1.0


@dataclass
class FinetuneEvalConfig:
    """What evaluation to run and on how many labels."""

    # linear: probe on frozen features | finetune: all weights + a new head | knn | distill: a student trained on
    # the teacher's (teacher=) softened predictions for all training images, labels unused (distill.label_weight)
    mode: str = "linear"
    label_fraction: float = 1.0  # class-balanced share of the labels: 0.01 = 500 CIFAR-10 images, nested by seed
    # Where hyperparameters (probe weight decay, fine-tuning epochs) are chosen. 0: on data.val_size images held out
    # of train, whose labels lie beyond the fraction (5,000 labels for selection at 1% = 500 training labels).
    # s > 0: a class-balanced share s of the labeled fraction itself is the validation split and the rest is trained
    # on, so selection sees only the fraction's labels (data.val_size is not used).
    val_share_of_labels: float = 0.0
    augment: bool = False  # linear: random crop + flip with features computed on the fly
    # What the evaluation reads: encoder (h, the encoder's output) | headK (the output of the pretrained projection
    # head's K-th layer, with its batch norm and ReLU; the last layer's is g(h), what the loss compared). kNN and the
    # linear probe read them frozen; finetune and distill train the encoder and those K layers with the new head
    # (SimCLRv2 fine-tunes from head1 of its 3-layer head)
    features: str = "encoder"
    val_every: int = 10  # finetune: epochs between validation measurements; 0 = at the end only
    knn_k: int = 200  # neighbours that vote
    knn_temperature: float = 0.1  # weighted vote: each neighbour counts exp(cosine / T)
    knn_vote: str = "weighted"  # weighted | majority (one vote per neighbour; with knn_k=10: dkobak's protocol)
    # linear and finetune: after the evaluation, Grad-CAM (ResNets) or attention (ViTs) of the trained classifier on
    # 16 fixed test images: gradcam.png or attention.png in the run directory and W&B media (see explain.py)
    explain: bool = False


@dataclass
class DistillConfig:
    """eval.mode=distill (SimCLRv2 Sec. 2.2): the student learns the teacher's predictions on unlabeled images."""

    # both the teacher's and the student's logits are divided by it before the softmax (SimCLRv2: 1 is best)
    temperature: float = 1.0
    # > 0: plus this weight x cross-entropy on the labeled images of each batch (those of eval.label_fraction)
    label_weight: float = 0.0


@dataclass
class FinetuneRunConfig:
    """The evaluation's run directory, checkpoints (fine-tuning) and distributed backend."""

    dir: str = "runs"  # parent of the run directory <run.dir>/<run.name>
    name: str = ""  # empty = <checkpoint run>-<mode>[-<pct>pct]-s<seed>
    ckpt_every: int = 1  # finetune mode: epochs between checkpoints (also written at the end and on a stop signal)
    backend: str = "auto"  # process group under torchrun: auto (NCCL on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class FinetuneConfig:
    """Evaluate a pretrained encoder (or a random one: checkpoint=none) on labeled images: linear probe, fine-tuning
    or kNN. Fine-tuning from checkpoint=none with all labels is the supervised baseline."""

    seed: int = 0  # the head's initialization, augmentation, batch order and the label subset
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    checkpoint: str = ""  # a pretraining run directory, its checkpoints/last.pt, an encoder.pt, or none
    teacher: str = ""  # eval.mode=distill: a fine-tuning run directory (its classifier.pt is the teacher)
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: FinetuneTrainConfig = field(default_factory=lambda: FinetuneTrainConfig(epochs=100, batch_size=256))
    optim: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(
        name="sgd", base_lr=0.05, weight_decay=5e-4, warmup_epochs=0.0, nesterov=True))
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # linear mode
    distill: DistillConfig = field(default_factory=DistillConfig)  # distill mode
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ExportConfig:
    """Export a pretraining run's encoder or an evaluation run's classifier (encoder + head) for deployment, then read
    the file back and check its outputs against the eager model on real test images. Input contract of every
    export: uint8 images [N, 3, S, S] at the size S the encoder was trained at, RGB 0-255, normalization inside; output
    features [N, D] or logits [N, C]."""

    # a pretraining run directory (its encoder), an evaluation run directory (its classifier.pt: encoder + head), or
    # one of their files (encoder.pt, checkpoints/last.pt, classifier.pt)
    checkpoint: str = ""
    # torchscript (torch.jit) | onnx (dynamic batch, onnxruntime) | onnx_int8 (statically quantized ONNX: int8
    # per-channel weights, uint8 activations calibrated on training images) | safetensors (+ metadata)
    format: str = "onnx"
    out: str = ""  # the file to write, which must not exist; <out>.json beside it records the contract and the check
    check_only: bool = False  # check the existing export at `out` (SHA-256 and outputs) instead of writing one
    check_images: int = 512  # test images the export is checked on (class-balanced, seeded)
    tolerance: float = 1e-4  # largest allowed max |exported - eager| / max |eager| on those images (not onnx_int8)
    calibration_images: int = 512  # onnx_int8: training images that set the scales (class-balanced, seeded)
    max_top1_drop: float = 1.0  # onnx_int8 classifier: largest allowed test top-1 loss against eager, in points
    min_feature_cosine: float = 0.98  # onnx_int8 encoder: smallest allowed mean cosine of its features to eager's
    data: DataConfig = field(default_factory=DataConfig)  # where the check's test images come from


@dataclass
class ExplainConfig:
    """Show what an evaluation's classifier looks at: Grad-CAM (ResNets) or the class token's attention (ViTs) on a
    fixed, class-balanced set of test images, as a PNG grid (image, heat map, overlay, predicted and true class) in
    the evaluation's run directory and as W&B media."""

    checkpoint: str = ""  # an evaluation run directory holding classifier.pt (linear or finetune mode), or the file
    method: str = "auto"  # auto (by architecture) | gradcam (ResNets: last stage) | attention (ViTs: last block)
    images: int = 16  # test images shown: the first of each class in turn, then the second, ...
    out: str = ""  # the PNG to write; empty = <evaluation run dir>/<method>.png. An existing file is never replaced
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)  # where the test images come from
    wandb: WandbConfig = field(default_factory=WandbConfig)  # a run of job type "explain" with the grid as media


# Keys (or key prefixes) that say where or how fast a run goes, not what it computes: two runs that differ only here
# are the same experiment (tables match runs ignoring them; a resumed run may change them).
NOT_RESULT_KEYS = ("run.", "wandb.", "device", "data.root", "data.download", "data.cache_dir", "train.log_every",
                   "train.compile", "loss.impl", "checkpoint", "teacher")
# What a resumed run may change: only those. pretrain.py handles train.epochs itself (a finished run may be extended as
# a new schedule phase, recorded in train.schedule_restarts; an unfinished one keeps its length).
RESUMABLE_CHANGES = NOT_RESULT_KEYS

# Allowed values of string keys. An entry of None in a tuple is not used; paths are free-form.
CHOICES = {
    "device": None,  # checked by core.device
    "data.name": ("cifar10", "cifar100", "stl10", "folder", "synthetic"),
    "model.stem": ("auto", "cifar", "imagenet"),
    "model.arch": ARCHS,
    "loss.impl": LOSS_IMPLS,
    "loss.name": LOSSES,
    "train.precision": ("auto", "fp32", "bf16", "fp64"),
    "optim.name": OPTIMIZERS,
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "eval.mode": ("linear", "finetune", "knn", "distill"),
    "eval.knn_vote": ("weighted", "majority"),
    "model.forward_views": ("joint", "separate"),
    "aug.normalize": ("auto", "cifar", "imagenet", "none"),
    "run.backend": ("auto", "nccl", "gloo"),
    "format": EXPORT_FORMATS,
    "method": ("auto", "gradcam", "attention"),
}

# (low, high, low_inclusive) for numeric keys; high None = unbounded.
RANGES = {
    "data.val_size": (0, None, True),
    "data.train_limit": (0, None, True),
    "data.image_size": (0, None, True),
    "model.width": (1, None, True),
    "model.proj_layers": (0, None, True),
    "model.proj_hidden_dim": (1, None, True),
    "model.proj_dim": (1, None, True),
    "loss.temperature": (0, None, False),
    "loss.dcl_sigma": (0, None, False),
    "aug.local_crops": (0, None, True),
    "aug.local_size": (0, None, True),
    "aug.local_min_scale": (0, 1, False),
    "aug.local_max_scale": (0, 1, False),
    "aug.strength": (0, 2.5, True),  # hue range 0.2 s must stay within [-0.5, 0.5]
    "aug.min_scale": (0, 1, False),
    "aug.jitter_prob": (0, 1, True),
    "aug.gray_prob": (0, 1, True),
    "aug.blur_prob": (0, 1, True),
    "aug.solarize_prob": (0, 1, True),
    "train.epochs": (1, None, True),
    "train.batch_size": (1, None, True),
    "train.log_every": (1, None, True),
    "train.micro_batch": (0, None, True),
    "optim.base_lr": (0, None, False),
    "optim.weight_decay": (0, None, True),
    "optim.momentum": (0, 1, True),
    "optim.warmup_epochs": (0, None, True),
    "optim.min_lr_ratio": (0, 1, True),
    "optim.lars_trust_coeff": (0, None, False),
    "eval.knn_every": (0, None, True),
    "eval.knn_k": (1, None, True),
    "eval.knn_temperature": (0, None, False),
    "eval.online_lr": (0, None, False),
    "eval.label_fraction": (0, 1, False),
    "eval.val_share_of_labels": (0, 1, True),
    "eval.val_every": (0, None, True),
    "train.mixup_alpha": (0, None, True),
    "train.cutmix_alpha": (0, None, True),
    "train.mix_prob": (0, 1, True),
    "train.cutmix_switch_prob": (0, 1, True),
    "train.label_smoothing": (0, 1, True),
    "train.grad_clip": (0, None, True),
    "train.ema_decay": (0, 1, True),
    "optim.layer_decay": (0, 1, False),
    "distill.temperature": (0, None, False),
    "distill.label_weight": (0, None, True),
    "probe.epochs": (1, None, True),
    "probe.batch_size": (1, None, True),
    "probe.lr": (0, None, False),
    "run.ckpt_every": (1, None, True),
    "check_images": (1, None, True),
    "images": (1, 256, True),
    "tolerance": (0, None, False),
    "calibration_images": (1, None, True),
    "max_top1_drop": (0, 100, True),
    "min_feature_cosine": (-1, 1, True),
}
