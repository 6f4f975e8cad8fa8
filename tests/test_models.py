import pytest
import torch
import torchvision

from losses import nt_xent
from models import SimCLR, create_encoder, projection_head


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_parameters_equal_torchvision_without_fc_and_with_the_cifar_stem(arch):
    ours = create_encoder(arch)
    theirs = getattr(torchvision.models, arch)()
    count = lambda m: sum(p.numel() for p in m.parameters())
    stem_difference = 64 * 3 * (7 * 7 - 3 * 3)  # 7x7 -> 3x3 first conv
    assert count(ours) == count(theirs) - count(theirs.fc) - stem_difference
    assert set(ours.state_dict()) == set(theirs.state_dict()) - {"fc.weight", "fc.bias"}
    assert ours.conv1.kernel_size == (3, 3) and ours.conv1.stride == (1, 1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_with_torchvision_weights_computes_torchvision_features(arch):
    """Our blocks are torchvision's: its weights load strictly (ImageNet stem, width 64) and give its features."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)()
    theirs.fc = torch.nn.Identity()
    with torch.no_grad():
        theirs(torch.randn(8, 3, 64, 64))  # running statistics that are not the initial ones
    ours = create_encoder(arch, stem="imagenet").eval()
    ours.load_state_dict(theirs.eval().state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(images), theirs(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("resnet50", 2048), ("vit_tiny", 192)])
def test_feature_dims_and_32px_input(arch, dim):
    enc = create_encoder(arch).eval()
    assert enc.feature_dim == dim
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_narrow_resnet_and_vit_small():
    assert create_encoder("resnet18", width=8).feature_dim == 64
    assert create_encoder("resnet50", width=16).feature_dim == 512
    vit = create_encoder("vit_small")
    assert vit.feature_dim == 384 and vit.patch_embed.num_patches == 64
    with pytest.raises(ValueError):
        create_encoder("vit_tiny", width=8)
    with pytest.raises(ValueError):
        create_encoder("resnet9")


@pytest.mark.parametrize("layers, linears", [(2, 2), (3, 3)])
def test_projection_head_depth(layers, linears):
    head = projection_head(64, 32, 16, layers)
    assert sum(isinstance(m, torch.nn.Linear) for m in head) == linears
    assert head(torch.randn(4, 64)).shape == (4, 16)


def test_simclr_forward_returns_loss_and_detached_embeddings():
    enc = create_encoder("resnet18", width=4)
    model = SimCLR(enc, projection_head(enc.feature_dim, 32, 16), temperature=0.5)
    out = model(torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32))
    assert out["loss"].ndim == 0 and out["z1"].shape == (6, 16) and not out["z1"].requires_grad
    out["loss"].backward()
    assert enc.conv1.weight.grad is not None


def test_simclr_with_a_vit_trains_one_step():
    enc = create_encoder("vit_tiny")
    model = SimCLR(enc, projection_head(enc.feature_dim, 64, 16, num_layers=3), temperature=0.2)
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and enc.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("hidden_bn, out_bn, layout", [
    (True, False, [("Linear", False), ("BatchNorm1d",), ("ReLU",), ("Linear", True)]),  # SimCLR v1 (default)
    (False, False, [("Linear", True), ("ReLU",), ("Linear", True)]),  # dkobak
    (True, True, [("Linear", False), ("BatchNorm1d",), ("ReLU",), ("Linear", False), ("BatchNorm1d",)]),  # lightly
])
def test_projection_head_variants(hidden_bn, out_bn, layout):
    head = projection_head(64, 32, 16, hidden_bn=hidden_bn, out_bn=out_bn)
    got = [(type(m).__name__, m.bias is not None) if isinstance(m, torch.nn.Linear) else (type(m).__name__,)
           for m in head]
    assert got == layout  # a linear has a bias exactly where no batch norm follows it
    assert head(torch.randn(4, 64)).shape == (4, 16)


def _tiny_simclr(**kw):
    torch.manual_seed(0)
    enc = create_encoder("resnet18", width=4)
    return SimCLR(enc, projection_head(enc.feature_dim, 32, 16), temperature=0.5, **kw)


def test_per_view_batch_norm_equals_separate_forward_passes():
    """dkobak's and lightly's model(view1), model(view2): the same loss, gradients and running statistics."""
    from models.view_bn import per_view_batch_norm

    per_view, two_passes, joint = _tiny_simclr().double(), _tiny_simclr().double(), _tiny_simclr().double()
    per_view_batch_norm(per_view)
    v1, v2 = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randn(8, 3, 32, 32, dtype=torch.float64)
    ours = per_view(v1, v2)["loss"]
    z1, z2 = (two_passes.head(two_passes.encoder(v)) for v in (v1, v2))  # literally one forward per view
    theirs = nt_xent(z1, z2, 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert not torch.allclose(joint(v1, v2)["loss"], theirs)  # shared statistics are another function
    ours.backward(), theirs.backward()
    for (name, p), q in zip(per_view.named_parameters(), two_passes.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11 * float(q.grad.abs().max()), msg=name)
    for (name, a), b in zip(per_view.state_dict().items(), two_passes.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=name)  # running statistics: updated twice
    assert set(per_view.state_dict()) == set(joint.state_dict())  # checkpoints load into plain modules
    per_view.eval(), two_passes.eval()
    separately = [two_passes.head(two_passes.encoder(v)) for v in (v1, v2)]
    torch.testing.assert_close(per_view(v1, v2)["loss"], nt_xent(*separately, 0.5))


def test_online_classifier_learns_without_touching_the_encoder_gradient():
    plain, online = _tiny_simclr(), _tiny_simclr(num_classes=10)
    v1, v2, labels = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    reference = plain(v1, v2)
    out = online(v1, v2, labels)
    assert out["online_correct"].dtype == torch.long and 0 <= int(out["online_correct"]) <= 16
    torch.testing.assert_close(out["loss"], reference["loss"])  # the NT-Xent is untouched
    (out["loss"] + out["online_loss"]).backward()
    reference["loss"].backward()
    for (name, p), q in zip(online.encoder.named_parameters(), plain.encoder.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)  # stop-gradient: identical encoder gradients
    assert online.classifier.weight.grad.abs().sum() > 0 and online.head[0].weight.grad is not None
    assert "online_loss" not in online(v1, v2)  # no labels, no classifier loss


@pytest.mark.parametrize("forward_views", ["joint", "separate"])
def test_compiled_step_keeps_gradients_and_running_statistics(forward_views):
    """torch.compile (aot_eager: the same graph capture and functionalization as Inductor, no C++ build) must not
    lose batch norm's running-statistic updates, which eval-mode features (kNN, probes) depend on."""
    import copy

    from configs.load import load_config
    from training.pretraining import StepContext, build_model, forward_backward

    torch.manual_seed(0)
    cfg = load_config(["model.width=4", "device=cpu", f"model.forward_views={forward_views}"])
    eager = build_model(cfg, torch.device("cpu"))
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy, backend="aot_eager")
    views = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    for _ in range(2):
        for model in (eager, compiled):
            forward_backward(StepContext(model, None, None, torch.device("cpu"), torch.float32), *views)
    theirs = compiled_copy.state_dict()
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(theirs[name], value, msg=name)
    assert theirs["encoder.bn1.num_batches_tracked"] == (2 if forward_views == "joint" else 4)
    for (name, p), q in zip(eager.named_parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


class _LinearEncoder(torch.nn.Sequential):
    feature_dim = 32

    def __init__(self):
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 32))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_bf16_model_keeps_an_fp32_loss_backward_when_compiled(impl):
    """bf16 autocasts the networks only: a compiled step (aot_eager traces forward and backward as Inductor does)
    must compute the same gradients as eager. With autocast around the compiled call, the loss's similarity
    gradients were traced in bf16 (a relative gradient error of ~2e-3 at T = 0.1)."""
    torch.manual_seed(0)
    eager = SimCLR(_LinearEncoder(), torch.nn.Linear(32, 16), temperature=0.1, loss_impl=impl,
                   compute_dtype=torch.bfloat16)
    twin = SimCLR(_LinearEncoder(), torch.nn.Linear(32, 16), temperature=0.1, loss_impl=impl,
                  compute_dtype=torch.bfloat16)
    twin.load_state_dict(eager.state_dict())
    views = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    eager(*views)["loss"].backward()
    out = torch.compile(twin, backend="aot_eager")(*views)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and out["z1"].dtype == torch.bfloat16  # bf16 head, fp32 loss
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert ((q.grad - p.grad).norm() / p.grad.norm()).item() < 1e-6, name


def test_every_configurable_name_has_an_implementation():
    """core.names is the one list the config accepts; each name must build (archs), run (loss) or exist (optimizers)."""
    from core.names import ARCHS, LOSS_IMPLS, OPTIMIZERS
    from optim.optimizers import create_optimizer
    from models.resnet import LAYOUTS
    from models.vit import SIZES

    assert set(LAYOUTS) | set(SIZES) == set(ARCHS)
    z = torch.randn(4, 8)
    assert all(torch.isfinite(nt_xent(z, z.flip(0), 0.5, impl=impl)) for impl in LOSS_IMPLS)
    assert all(create_optimizer(name, torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0) for name in OPTIMIZERS)


@pytest.mark.parametrize("momentum, affine", [(None, True), (0.1, False)])
def test_per_view_batch_norm_keeps_cumulative_averages_and_runs_without_affine(momentum, affine):
    """momentum=None (the cumulative moving average) failed; affine=False too. Three steps, two views each."""
    from models.view_bn import PerViewBatchNorm

    torch.manual_seed(0)
    ours = PerViewBatchNorm(3, momentum=momentum, affine=affine).double()
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine).double()
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
        out = ours(x)
        torch.testing.assert_close(out, torch.cat([theirs(x[:4]), theirs(x[4:])]))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 6


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_head_features_are_the_heads_intermediate_outputs(layers):
    """head_prefix(head, K) is the head's first K layers (each linear map with its batch norm and ReLU): its output
    is what the full head computes after that layer, and K = depth gives g(h). Depth 0 is no head: g(h) = h."""
    from models.heads import HeadFeatures, head_depth, head_prefix

    torch.manual_seed(0)
    head = projection_head(16, 12, 8, layers).eval()
    encoder = create_encoder("resnet18", width=2).eval()
    assert head_depth(head) == layers
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        h = encoder(images)
        expected, x = [h], h  # the head's output after each of its layers
        for i, module in enumerate(head):
            x = module(x.clone())
            if i + 1 == len(head) or isinstance(head[i + 1], torch.nn.Linear):
                expected.append(x)
        for k in range(layers + 1):
            features = HeadFeatures(encoder, head_prefix(head, k)).eval()
            torch.testing.assert_close(features(images), expected[k])
            assert features.feature_dim == expected[k].shape[1]
        torch.testing.assert_close(expected[-1], head(h))
    with pytest.raises(ValueError, match=f"has {layers} layer"):
        head_prefix(head, layers + 1)


def test_without_a_head_the_loss_compares_the_encoders_features():
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", width=2)
    model = SimCLR(encoder, projection_head(encoder.feature_dim, 8, 8, 0), temperature=0.5)
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model(v1, v2)
    h1, h2 = encoder(torch.cat([v1, v2])).chunk(2)
    torch.testing.assert_close(out["loss"], nt_xent(h1, h2, 0.5))
    assert out["z1"].shape == (4, encoder.feature_dim) and not list(model.head.parameters())
