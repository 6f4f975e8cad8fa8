"""Run with TRITON_INTERPRET=1 (CPU) or on a GPU by tests/test_loss.py: the fused NT-Xent with its Triton forward and
backward kernels against the reference, value and gradient in fp32, odd and even sizes, temperatures 0.05-1; and the
gathered form (candidates from every rank, this rank's block at an offset) against the blocked PyTorch path. Prints
one JSON object of worst relative errors and whether the kernels ran."""
import json
import sys
from unittest import mock

import torch

from losses import triton_nt_xent
from losses.nt_xent import _BlockedNTXent, nt_xent_fused, nt_xent_reference


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(device: str) -> None:
    worst = {"value": 0.0, "grad": 0.0, "gathered_grad": 0.0, "used_triton": True, "backward_calls": 0}
    calls = mock.patch.object(triton_nt_xent, "softmax_products", wraps=triton_nt_xent.softmax_products)
    with calls as spy:
        for n, d, t in [(5, 16, 0.05), (8, 128, 0.5), (33, 200, 1.0), (64, 32, 0.1), (97, 64, 0.2)]:  # odd and even
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
            worst["grad"] = max(worst["grad"], _relative(fused_grad, ref_grad))
        # the gathered form: 2n anchors of rank 1 of 3, candidates [6n, d] with this rank's rows at offset 2n
        g = torch.Generator().manual_seed(0)
        n, d = 21, 48
        anchors = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=g), dim=1).to(device)
        others = torch.nn.functional.normalize(torch.randn(4 * n, d, generator=g), dim=1).to(device)
        grads = []
        for use_triton in (True, False):
            with mock.patch.object(triton_nt_xent, "available", lambda x, on=use_triton: on and x.dtype == torch.float32):
                a = anchors.clone().requires_grad_()
                candidates = torch.cat([others[:2 * n], a, others[2 * n:]])
                _BlockedNTXent.apply(a, candidates, 2 * n, 0.3).backward()
                grads.append(a.grad)
        worst["gathered_grad"] = _relative(grads[0], grads[1])
        worst["backward_calls"] = spy.call_count
    print(json.dumps(worst))


if __name__ == "__main__":
    main(sys.argv[1])
