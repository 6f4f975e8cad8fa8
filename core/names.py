"""The names configs accept and the code implements, defined once (configs/schema.py validates against them; models/,
losses/ and optim/optimizers.py build from them; tests check that each name has an implementation)."""
from __future__ import annotations

ARCHS = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small")  # models.create_encoder
LOSS_IMPLS = ("auto", "reference", "fused")  # losses.nt_xent(impl=...), losses.contrastive(impl=...)
LOSSES = ("ntxent", "supcon", "dcl", "dclw")  # models.SimCLR(loss_name=...)
OPTIMIZERS = ("lars", "sgd", "adamw")  # optim.optimizers.create_optimizer
EXPORT_FORMATS = ("torchscript", "onnx", "onnx_int8", "safetensors")  # deploy.export.write_export
