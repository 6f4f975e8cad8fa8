"""Grad-CAM equals its definition and finds localized evidence; ViT attention maps are the block's own attention,
as distributions over patches; explain.py and finetune.py eval.explain write the grid; misuse is refused."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explain as explain_entry
import finetune as finetune_entry
from tests.conftest import assert_user_error, assert_user_error_here, run_entry
from core.errors import UserError
from deploy.explain import attention_weights, cls_attention, fixed_images, grad_cam
from deploy.export import Deployable
from evaluation.finetuning import Classifier
from models import create_encoder


class _TinyEncoder(nn.Module):
    feature_dim = 5

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.layer4(self.stem(x)).mean(dim=(2, 3))


def test_grad_cam_equals_its_definition_computed_directly():
    torch.manual_seed(0)
    model = Classifier(_TinyEncoder(), 3).double()
    images = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    maps, logits = grad_cam(model, images)
    for i in range(4):  # one image at a time, by hand: A, dS/dA, alpha, ReLU, upsample, normalize
        a = model.encoder.layer4(model.encoder.stem(images[i:i + 1]))
        score = model.head(a.mean(dim=(2, 3)))[0]
        (grad,) = torch.autograd.grad(score[score.argmax()], a)
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
        expected = cam / cam.sum() if cam.sum() > 0 else torch.full_like(cam, 1 / cam.numel())
        torch.testing.assert_close(maps[i], expected.detach())
        assert logits[i].argmax() == score.argmax()
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(4, dtype=torch.float64))


def _squares(n: int, generator: torch.Generator, quadrant: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; class 1 has a bright 6x6 square (in ``quadrant`` 0-3 if given, else anywhere)."""
    images = torch.rand(n, 3, 32, 32, generator=generator) * 0.3
    labels = torch.randint(0, 2, (n,), generator=generator) if quadrant is None else torch.ones(n, dtype=torch.long)
    for i in torch.nonzero(labels).flatten().tolist():
        if quadrant is None:
            top, left = torch.randint(0, 27, (2,), generator=generator).tolist()
        else:
            top = (quadrant // 2) * 16 + int(torch.randint(2, 9, (1,), generator=generator))
            left = (quadrant % 2) * 16 + int(torch.randint(2, 9, (1,), generator=generator))
        images[i, :, top:top + 6, left:left + 6] = 1.0
    return images, labels


def test_grad_cam_puts_its_mass_where_the_class_evidence_is():
    """A small ResNet trained to tell 'a bright square somewhere' from noise: for images with the square in one
    quadrant, that quadrant holds the map's peak and more of its mass than any other quadrant, and on average over
    40% of it (a uniform map: 25%; the last stage is a 4x4 grid, so bilinear upsampling spreads some mass over the
    border)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Classifier(create_encoder("resnet18", 4), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        x, y = _squares(64, g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for quadrant in range(4):
        x, _ = _squares(16, g, quadrant)
        maps, logits = grad_cam(model, x, classes=torch.ones(16, dtype=torch.long))
        assert (logits.argmax(1) == 1).float().mean() > 0.9  # it learned the task
        shares = maps.view(16, 2, 16, 2, 16).sum(dim=(2, 4)).flatten(1)  # [16, 4]: mass per quadrant
        assert (shares.argmax(1) == quadrant).all(), shares
        peak = maps.flatten(1).argmax(1)
        assert ((peak // 32 // 16) * 2 + peak % 32 // 16 == quadrant).all()
        assert shares[:, quadrant].mean() > 0.4, shares[:, quadrant]


def test_vit_attention_maps_are_the_blocks_attention_as_distributions_over_patches():
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny").eval()
    model = Deployable(encoder, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), nn.Linear(encoder.feature_dim, 10)).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    maps, logits = cls_attention(model, images)
    assert maps.shape == (3, 32, 32) and logits.shape == (3, 10) and bool((maps >= 0).all())
    assert not maps.requires_grad and not logits.requires_grad  # plain values, ready to draw
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
    # the recomputed weights reproduce the block's attention output (timm uses a fused kernel that hides them)
    attention, seen = encoder.blocks[-1].attn, {}
    hook = attention.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(images)
        hook.remove()
        weights = attention_weights(attention, seen["x"])
        b, n, d = seen["x"].shape
        v = attention.qkv(seen["x"]).reshape(b, n, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
        out = attention.proj(attention.norm((weights @ v).transpose(1, 2).reshape(b, n, d)))
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(b, attention.num_heads, n))


def test_the_fixed_images_are_class_balanced_and_the_same_every_time():
    labels = torch.tensor([3, 1, 1, 0, 2, 3, 0, 2, 1, 0])
    chosen = fixed_images(labels, 6)
    assert chosen.tolist() == [3, 1, 4, 0, 6, 2]  # first of classes 0-3, then the second of classes 0-1
    assert torch.equal(fixed_images(labels, 6), chosen)


def test_finetune_explain_and_explain_py_write_the_grid(evaluated_run, tmp_path, capsys):
    png = evaluated_run / "gradcam.png"  # written by finetune.py eval.explain=true (the fixture)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    out = tmp_path / "again.png"
    shown = explain_entry.main([f"checkpoint={evaluated_run}", "data.name=synthetic", "device=cpu",
                                "wandb.mode=disabled", f"out={out}", "images=8"])
    assert "explained: gradcam of resnet18 (lin) on 8 test images" in capsys.readouterr().out
    assert out.stat().st_size > 10_000 and len(shown["predicted"]) == 8 and shown["method"] == "gradcam"


def test_explain_misuse_is_refused_and_nothing_is_overwritten(evaluated_run, pretrained_run, tmp_path, capsys):
    before = (evaluated_run / "gradcam.png").read_bytes()
    base = ["data.name=synthetic", "device=cpu", "wandb.mode=disabled"]
    # through the real command line once: exit status 2 and the error line
    assert_user_error(run_entry("explain.py", *base, f"checkpoint={evaluated_run}", "method=attention"),
                      "method=attention does not apply to resnet18")
    cases = [
        ([f"checkpoint={evaluated_run}"], "gradcam.png' already exists"),
        ([f"checkpoint={pretrained_run}"], "holds no classifier.pt"),
        ([f"checkpoint={tmp_path / 'missing'}"], "missing' does not exist"),
        ([f"checkpoint={evaluated_run}", "method=lime"], "method='lime' is not one of auto, gradcam, attention"),
    ]
    for args, fragment in cases:
        assert_user_error_here(capsys, explain_entry.main, [*base, *args], fragment)
    assert (evaluated_run / "gradcam.png").read_bytes() == before
    with pytest.raises(UserError, match="eval.explain needs a trained head"):
        finetune_entry.main(["checkpoint=none", "model.arch=resnet18", "eval.mode=knn", "eval.explain=true",
                             *base, f"run.dir={tmp_path}"])


def test_each_architecture_gets_its_own_method():
    assert explain_entry.check_method("auto", "vit_small") == "attention"
    assert explain_entry.check_method("auto", "resnet50") == "gradcam"
    with pytest.raises(UserError, match="method=gradcam does not apply to vit_tiny: use method=attention"):
        explain_entry.check_method("gradcam", "vit_tiny")
    with pytest.raises(UserError, match="method=attention does not apply to resnet18: use method=gradcam"):
        explain_entry.check_method("attention", "resnet18")
