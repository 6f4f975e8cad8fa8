import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from losses import nt_xent
from tests.conftest import REPO
nt_xent_module = importlib.import_module("losses.nt_xent")  # the package re-exports a function of that name
from losses.diagnostics import embedding_stats


def per_anchor_formula(z1, z2, t):
    """NT-Xent written anchor by anchor: -log exp(s_ip / t) / sum_{k != i} exp(s_ik / t), averaged."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2, n = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n2):
        p = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -(float(z[i] @ z[p]) / t - math.log(denom))
    return total / n2


@pytest.mark.parametrize("n, d, t", [(1, 4, 0.5), (5, 8, 0.1), (8, 3, 1.0), (7, 16, 0.05)])
def test_reference_equals_the_per_anchor_formula(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert nt_xent(z1, z2, t, impl="reference").item() == pytest.approx(per_anchor_formula(z1, z2, t), rel=1e-10)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))


def test_identical_views_give_the_lowest_loss_and_swapping_views_changes_nothing():
    z = torch.randn(6, 8)
    other = torch.randn(6, 8)
    assert nt_xent(z, z, 0.5) < nt_xent(z, other, 0.5)
    torch.testing.assert_close(nt_xent(z, other, 0.5), nt_xent(other, z, 0.5))


def test_low_precision_inputs_are_scored_in_fp32():
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    ref = nt_xent(z1, z2, 0.2)
    low = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.2)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 2e-2  # only the bf16 rounding of the inputs remains


def test_gather_without_process_group_is_the_local_loss():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5, gather=True), nt_xent(z1, z2, 0.5))


def test_unknown_impl():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), 0.5, impl="magic")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n, d, t", [(1, 16, 0.5), (7, 16, 0.05), (64, 128, 0.1), (33, 2048, 1.0), (100, 24, 0.2)])
def test_fused_equals_reference_in_value_and_gradient(monkeypatch, dtype, tol, n, d, t):
    monkeypatch.setattr(nt_xent_module, "BLOCK_ELEMENTS", 7 * 2 * n)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(n + d)
    z1 = torch.randn(n, d, dtype=dtype, generator=g, requires_grad=True)
    z2 = torch.randn(n, d, dtype=dtype, generator=g, requires_grad=True)
    ref = nt_xent(z1, z2, t, impl="reference")
    fused = nt_xent(z1, z2, t, impl="fused")
    assert fused.item() == pytest.approx(ref.item(), rel=tol, abs=tol)
    for mine, theirs in zip(torch.autograd.grad(fused, (z1, z2)), torch.autograd.grad(ref, (z1, z2))):
        assert ((mine - theirs).norm() / theirs.norm().clamp(min=1e-30)).item() < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_takes_low_precision_inputs_and_returns_their_dtype(dtype):
    z1 = torch.randn(32, 16).to(dtype).requires_grad_()
    z2 = torch.randn(32, 16).to(dtype).requires_grad_()
    fused = nt_xent(z1, z2, 0.2, impl="fused")
    ref = nt_xent(z1, z2, 0.2, impl="reference")
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(ref.item(), rel=1e-5)  # logits in fp32
    exact = nt_xent(z1.double(), z2.double(), 0.2, impl="reference")
    assert fused.item() == pytest.approx(exact.item(), rel=1e-6)  # fp32 scoring of the same low-precision inputs
    grad = torch.autograd.grad(fused, z1)[0]
    assert grad.dtype == dtype


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("inputs", [torch.float32, torch.bfloat16])  # bf16: what a head under autocast returns
def test_the_loss_is_fp32_inside_bf16_autocast(monkeypatch, impl, t, inputs):
    """The training step calls the loss inside bf16 autocast; value and gradients must still be fp32 numbers: equal
    to those outside autocast, and within fp32 rounding of fp64 on the same inputs. (backward() runs after the
    autocast region, as in the training step.)"""
    monkeypatch.setattr(nt_xent_module, "BLOCK_ELEMENTS", 3 * 512)  # the fused loss in several blocks
    g = torch.Generator().manual_seed(int(t * 100))
    z1, z2 = (torch.randn(256, 64, generator=g).to(inputs) for _ in range(2))

    def loss_and_grads(z1, z2, autocast):
        z1, z2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nt_xent(z1, z2, t, impl=impl)
        return loss, torch.autograd.grad(loss, (z1, z2))

    loss, grads = loss_and_grads(z1, z2, autocast=True)
    plain_loss, plain_grads = loss_and_grads(z1, z2, autocast=False)
    exact_loss, exact_grads = loss_and_grads(z1.double(), z2.double(), autocast=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert abs(loss.item() - exact_loss.item()) / exact_loss.item() < 1e-6
    for mine, plain, exact in zip(grads, plain_grads, exact_grads):
        assert mine.dtype == inputs
        torch.testing.assert_close(mine, plain, rtol=1e-5, atol=1e-7)
        if inputs == torch.float32:  # bf16 gradients are rounded to bf16 on their way out, as autograd must
            assert ((mine.double() - exact).norm() / exact.norm()).item() < 1e-5


def test_auto_picks_fused_only_for_large_batches(monkeypatch):
    calls = []
    monkeypatch.setattr(nt_xent_module, "nt_xent_fused", lambda *a, **k: calls.append("fused") or torch.zeros(()))
    monkeypatch.setattr(nt_xent_module, "nt_xent_reference", lambda *a, **k: calls.append("ref") or torch.zeros(()))
    nt_xent(torch.randn(8, 4), torch.randn(8, 4), 0.5)
    nt_xent(torch.randn(1100, 4), torch.randn(1100, 4), 0.5)
    assert calls == ["ref", "fused"]


def test_embedding_stats_against_direct_computation():
    z1, z2 = torch.randn(10, 6), torch.randn(10, 6)
    s = embedding_stats(z1, z2)
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    cos = u @ u.T
    pos = torch.cat([torch.diagonal(cos, 10), torch.diagonal(cos, -10)])
    mask = ~torch.eye(20, dtype=torch.bool)
    mask[torch.arange(10), torch.arange(10) + 10] = False
    mask[torch.arange(10) + 10, torch.arange(10)] = False
    torch.testing.assert_close(s["pos_cos"], pos.mean())
    torch.testing.assert_close(s["neg_cos"], cos[mask].mean())
    torch.testing.assert_close(s["align"], (u[:10] - u[10:]).square().sum(1).mean())


def run_triton_check(device, interpret):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(REPO / "tests" / "triton_interpret_check.py"), device], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_triton_matches(worst: dict) -> None:
    assert worst["used_triton"] and worst["backward_calls"] == 6, worst  # 5 sizes + the gathered form, all Triton
    assert worst["value"] < 1e-5 and worst["grad"] < 1e-5 and worst["gathered_grad"] < 1e-5, worst


def test_triton_kernels_in_the_interpreter():
    """The Triton kernels' logic, run by Triton's CPU interpreter: fused (Triton forward and backward) == reference
    in fp32, odd and even sizes, temperatures 0.05-1, and the gathered form with an offset."""
    _assert_triton_matches(run_triton_check("cpu", interpret=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_the_gpu():
    _assert_triton_matches(run_triton_check("cuda", interpret=False))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_loss_compiles_without_graph_breaks(impl):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without C++ code generation."""
    compiled = torch.compile(lambda a, b: nt_xent(a, b, 0.5, impl=impl), fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(9, 8, generator=g, requires_grad=True) for _ in range(2))
    compiled(z1, z2).backward()
    grads = torch.cat([z1.grad, z2.grad])
    z1.grad = z2.grad = None
    nt_xent(z1, z2, 0.5, impl=impl).backward()
    torch.testing.assert_close(grads, torch.cat([z1.grad, z2.grad]), rtol=1e-6, atol=1e-7)


def test_triton_kernels_compile_for_an_h100_without_one():
    """The interpreter does not check what only the compiler sees (static branches, shapes of tl.dot, shared memory):
    compile every kernel for sm_90 down to a cubin, no GPU needed."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels imported under it are interpreted, not compilable: the
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # same test, in a fresh process
        this = f"{__file__}::test_triton_kernels_compile_for_an_h100_without_one"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", this], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]
        return
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from losses import triton_nt_xent

    scalars = {"m": "i32", "total": "i32", "dim": "i32", "offset": "i32", "inv_temperature": "fp32"}
    kernels = [(triton_nt_xent._row_logsumexp_kernel, {"anchors": "*fp32", "candidates": "*fp32", "out": "*fp32"},
                {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32})]
    backward = {"anchors": "*fp32", "candidates": "*fp32", "lse": "*fp32", "out": "*fp32"}
    kernels += [(triton_nt_xent._softmax_product_kernel, backward,
                 {"PER_CANDIDATE": side, "BLOCK": 64, "BLOCK_D": 32, "BLOCK_OUT": 128}) for side in (False, True)]
    for kernel, args, constants in kernels:
        signature = {**args, **scalars, **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 228 * 1024
