"""Swap the batch norms of a model for another batch-norm class (global, per-view), keeping weights and buffers."""
from __future__ import annotations

from torch import nn


def replace_batch_norm(module: nn.Module, norm_class: type) -> nn.Module:
    """Every BatchNorm1d/2d in ``module`` -> ``norm_class`` (a ``_BatchNorm`` subclass) with the same settings,
    parameters and buffers; in place, state-dict keys unchanged, so checkpoints load into plain modules."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            replacement = norm_class(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats).to(child.weight.device, child.weight.dtype)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            replace_batch_norm(child, norm_class)
    return module
