"""Contrastive losses as pure functions, and the differentiable cross-process gather."""
from losses.contrastive import contrastive
from losses.gather import gather_with_grad
from losses.nt_xent import nt_xent, nt_xent_reference

__all__ = ["contrastive", "gather_with_grad", "nt_xent", "nt_xent_reference"]
