"""losses.contrastive: the formula in fp64, NT-Xent as its two-view case, lightly's DCL / DCLW, the blocked and Triton
paths, fp32 under autocast (the 1 == 2 processes proof is in tests/dist_worker.py)."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from losses import contrastive, nt_xent
from tests.conftest import REPO

contrastive_module = importlib.import_module("losses.contrastive")  # the package re-exports a function of that name
VARIANTS = [("supcon", {}), ("dcl", {"decoupled": True}), ("dclw", {"decoupled": True, "dcl_sigma": 0.5}),
            ("weighted", {"dcl_sigma": 0.2})]


def direct_formula(z: torch.Tensor, group: torch.Tensor, t: float, decoupled: bool = False, dcl_sigma=None):
    """The loss written anchor by anchor in fp64 (autograd gives its gradient; DCLW's weights held constant)."""
    u = torch.nn.functional.normalize(z.double(), dim=1)
    s = u @ u.T
    pairs = [(i, p) for i in range(len(u)) for p in range(len(u)) if p != i and group[p] == group[i]]
    if dcl_sigma is not None:
        scale = torch.stack([torch.exp((s[i, p].detach() - 1) / dcl_sigma) for i, p in pairs]).mean()
    terms = []
    for i in range(len(u)):
        positives = [p for p in range(len(u)) if p != i and group[p] == group[i]]
        denominator = [a for a in range(len(u)) if a != i and not (decoupled and group[a] == group[i])]
        if not positives or not denominator:
            continue
        lse = torch.logsumexp(torch.stack([s[i, a] / t for a in denominator]), dim=0)
        weight = (lambda p: 2 - torch.exp((s[i, p].detach() - 1) / dcl_sigma) / scale) if dcl_sigma else (lambda p: 1)
        terms.append(lse - sum(weight(p) * s[i, p] / t for p in positives) / len(positives))
    return torch.stack(terms).mean()


def random_groups(views: int, g: torch.Generator) -> torch.Tensor:
    """Groups of 1 to 8 views, shuffled: some anchors have no positive."""
    sizes, total = [], 0
    while total < views:
        sizes.append(min(int(torch.randint(1, 9, (1,), generator=g)), views - total))
        total += sizes[-1]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[torch.randperm(views, generator=g)]


def value_and_grad(z, group, t, impl, **kw):
    z = z.detach().clone().requires_grad_()
    loss = contrastive(z, group, t, impl=impl, **kw)
    return loss, torch.autograd.grad(loss, z)[0]


@pytest.mark.parametrize("variant, kw", VARIANTS)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_equals_the_fp64_formula_in_value_and_gradient(monkeypatch, variant, kw, impl):
    monkeypatch.setattr(contrastive_module, "BLOCK_ELEMENTS", 100)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(len(variant))
    for views, dim, t in [(23, 8, 0.1), (40, 16, 0.5), (9, 4, 1.0)]:
        z, group = torch.randn(views, dim, generator=g), random_groups(views, g)
        z64 = z.double().requires_grad_()
        exact = direct_formula(z64, group, t, **kw)
        exact_grad = torch.autograd.grad(exact, z64)[0]
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            loss, grad = value_and_grad(z.to(dtype), group, t, impl, **kw)
            assert abs(loss.item() - exact.item()) <= tol * abs(exact.item()), (dtype, views)
            assert ((grad.double() - exact_grad).norm() / exact_grad.norm()).item() < tol * 10, (dtype, views)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_nt_xent_is_the_two_view_case(monkeypatch, impl):
    monkeypatch.setattr(contrastive_module, "BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(17, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = contrastive(torch.cat([z1, z2]), torch.arange(17).repeat(2), 0.2, impl=impl)
    theirs = nt_xent(z1, z2, 0.2, impl=impl)
    assert abs(ours.item() - theirs.item()) < 1e-12
    for mine, expected in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(theirs, (z1, z2))):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_two_views_equal_lightlys_dcl_and_dclw(impl):
    from lightly.loss import DCLLoss, DCLWLoss

    g = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(20, 12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    group = torch.arange(20).repeat(2)
    for ours_kw, theirs in (({}, DCLLoss(temperature=0.2)), ({"dcl_sigma": 0.5}, DCLWLoss(temperature=0.2, sigma=0.5))):
        ours = contrastive(torch.cat([z1, z2]), group, 0.2, decoupled=True, impl=impl, **ours_kw)
        reference = theirs(z1, z2)
        assert abs(ours.item() - reference.item()) < 1e-10 * abs(reference.item())
        for mine, expected in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(reference, (z1, z2))):
            torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-13)


def test_anchors_without_positives_have_no_term_and_no_gradient():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    group = torch.tensor([0, 0, 1, 2, 3, 4])  # only views 0 and 1 are positives
    for impl in ("reference", "fused"):
        loss = contrastive(z, group, 0.5, impl=impl)
        assert torch.isfinite(loss) and loss.item() == pytest.approx(direct_formula(z, group, 0.5).item(), rel=1e-12)
        alone = contrastive(z, torch.arange(6), 0.5, impl=impl)  # nobody has a positive: 0, and a zero gradient
        assert alone.item() == 0.0 and not torch.autograd.grad(alone, z)[0].any()
        everyone = contrastive(z, torch.zeros(6, dtype=torch.long), 0.5, decoupled=True, impl=impl)
        assert everyone.item() == 0.0  # decoupled with one group: no negatives, no term


def test_the_fused_path_holds_one_block_of_logits_at_a_time(monkeypatch):
    """Memory linear in V: the blocked path never forms more than BLOCK_ELEMENTS similarities at once (bench/loss.py
    measures the peak memory itself)."""
    monkeypatch.setattr(contrastive_module, "BLOCK_ELEMENTS", 512)
    shapes = []
    blocks = contrastive_module._row_blocks

    def spy(anchors, candidates):
        for rows, sims in blocks(anchors, candidates):
            shapes.append(tuple(sims.shape))
            yield rows, sims
    monkeypatch.setattr(contrastive_module, "_row_blocks", spy)
    z = torch.randn(300, 8, requires_grad=True)
    contrastive(z, torch.arange(300) // 10, 0.1, impl="fused").backward()
    assert shapes and all(rows * cols <= 512 for rows, cols in shapes) and sum(r for r, _ in shapes) == 2 * 300


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_fp32_under_bf16_autocast(impl):
    g = torch.Generator().manual_seed(3)
    z, group = torch.randn(64, 16, generator=g).bfloat16(), torch.arange(64) // 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = contrastive(z, group, 0.05, impl=impl)
    exact = contrastive(z.double(), group, 0.05, impl="reference")
    assert inside.dtype == torch.float32 and abs(inside.item() - exact.item()) < 1e-6 * exact.item()


def test_bad_arguments():
    with pytest.raises(ValueError, match="z must be"):
        contrastive(torch.randn(4, 3), torch.arange(5), 0.5)
    with pytest.raises(ValueError, match="dcl_sigma"):
        contrastive(torch.randn(4, 3), torch.arange(4), 0.5, dcl_sigma=0.0)
    with pytest.raises(ValueError, match="impl"):
        contrastive(torch.randn(4, 3), torch.arange(4), 0.5, impl="magic")


def test_triton_kernels_in_the_interpreter():
    """The Triton kernels' logic (Triton's CPU interpreter): equal to the blocked PyTorch path in fp32 for each
    variant, and in the gathered form (this rank's anchors at an offset among the candidates)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = [float(x) for x in result.stdout.split()]
    assert len(worst) == 10 and max(worst) < 2e-6, worst


TRITON_CHECK = """
import importlib
from unittest import mock
import torch
from losses import contrastive, triton_contrastive
blocked = importlib.import_module("losses.contrastive")._BlockedContrastive
assert triton_contrastive.available(torch.zeros(1))
g = torch.Generator().manual_seed(0)
worst = []
def both(fn):
    out = []
    for on in (True, False):
        with mock.patch.object(triton_contrastive, "available", lambda x, on=on: on):
            out.append(fn())
    return out
for kw in ({}, {"decoupled": True}, {"decoupled": True, "dcl_sigma": 0.5}, {"dcl_sigma": 0.3}):
    z, group = torch.randn(70, 40, generator=g), torch.randint(0, 9, (70,), generator=g)
    def run():
        x = z.clone().requires_grad_()
        loss = contrastive(x, group, 0.2, impl="fused", **kw)
        return loss.detach(), torch.autograd.grad(loss, x)[0]
    (l1, g1), (l2, g2) = both(run)
    worst += [(abs(l1 - l2) / abs(l2)).item(), ((g1 - g2).norm() / g2.norm()).item()]
anchors = torch.nn.functional.normalize(torch.randn(21, 24, generator=g), dim=1)
others = torch.nn.functional.normalize(torch.randn(42, 24, generator=g), dim=1)
groups = torch.randint(0, 6, (63,), generator=g)
def gathered():
    a = anchors.clone().requires_grad_()
    candidates = torch.cat([others[:21], a, others[21:]])
    loss = blocked.apply(a, candidates, groups[21:42], groups, 21, 0.3, False, 0.5, False)
    return loss.detach(), torch.autograd.grad(loss, a)[0]
(l1, g1), (l2, g2) = both(gathered)
worst += [(abs(l1 - l2) / abs(l2)).item(), ((g1 - g2).norm() / g2.norm()).item()]
print(*worst)
"""


def test_triton_kernels_compile_for_an_h100_without_one():
    """What only the compiler sees (static branches, tl.dot shapes, shared memory): every specialization compiled
    for sm_90 down to a cubin, no GPU needed."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels imported under TRITON_INTERPRET are interpreted, not compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from losses import triton_contrastive

    pointers = {"anchors": "*fp32", "candidates": "*fp32", "group": "*i64", "groups": "*i64"}
    scalars = {"m": "i32", "total": "i32", "dim": "i32", "offset": "i32", "inv_temperature": "fp32",
               "inv_sigma": "fp32"}
    forward = {**pointers, **{k: "*fp32" for k in ("lse_out", "count_out", "pos_out", "e_sum_out", "e_sim_out")}}
    backward = {**pointers, **{k: "*fp32" for k in ("lse", "coef", "inv_count", "scale", "out")}}
    for decoupled, weighted in ((False, False), (True, True)):  # each static branch compiled once, either way
        flags = {"DECOUPLED": decoupled, "WEIGHTED": weighted}
        kernels = [(triton_contrastive._row_statistics_kernel, forward,
                    {**flags, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32})]
        kernels += [(triton_contrastive._gradient_product_kernel, backward,
                     {**flags, "PER_CANDIDATE": side, "BLOCK": 64, "BLOCK_D": 32, "BLOCK_OUT": 128})
                    for side in (False, True)]
        for kernel, args, constants in kernels:
            signature = {**args, **scalars, **{name: "constexpr" for name in constants}}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                      target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"] and compiled.metadata.shared <= 228 * 1024
