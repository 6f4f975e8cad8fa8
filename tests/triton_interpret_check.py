"""Run with TRITON_INTERPRET=1 (CPU) or on a GPU by tests/test_loss.py: the fused NT-Xent with its Triton forward
against the reference, value and gradient in fp32; prints one JSON object of worst relative errors."""
import json
import sys

import torch

from losses import triton_nt_xent
from losses.nt_xent import nt_xent_fused, nt_xent_reference


def main(device: str) -> None:
    worst = {"value": 0.0, "grad": 0.0, "used_triton": True}
    for n, d, t in [(5, 16, 0.05), (8, 128, 0.5), (33, 2048, 1.0), (64, 32, 0.1)]:  # odd and even n
        g = torch.Generator().manual_seed(n)
        z1, z2 = (torch.randn(n, d, generator=g).to(device) for _ in range(2))
        worst["used_triton"] &= triton_nt_xent.available(z1)
        results = []
        for loss_fn in (nt_xent_fused, nt_xent_reference):
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            loss = loss_fn(a, b, t)
            loss.backward()
            results.append((loss.detach(), torch.cat([a.grad, b.grad])))
        (fused, fused_grad), (ref, ref_grad) = results
        worst["value"] = max(worst["value"], (abs(fused - ref) / abs(ref)).item())
        worst["grad"] = max(worst["grad"], ((fused_grad - ref_grad).norm() / ref_grad.norm()).item())
    print(json.dumps(worst))


if __name__ == "__main__":
    main(sys.argv[1])
