"""The fine-tuning toolkit: MixUp/CutMix follow their laws, label smoothing is F.cross_entropy's, clipping bounds the
gradient norm, the EMA is its formula, layer-wise lr decay scales ViT blocks geometrically; bad combinations refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import finetune as finetune_entry
from core.errors import UserError
from evaluation.finetune_tools import BatchMixer, classification_loss, weight_average
from evaluation.finetuning import Classifier, finetune_step
from optim.optimizers import create_optimizer, set_lr

CLASSES = 10


def _batch(b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (b,), generator=g)


def test_mixup_mixes_images_and_targets_with_one_beta_distributed_weight():
    alpha, lams = 0.4, []
    mixer = BatchMixer(CLASSES, mixup_alpha=alpha, cutmix_alpha=0.0, seed=1)
    for step in range(400):
        x, y = _batch(seed=step)
        mixed, targets = mixer(x, y, step)
        assert targets.shape == (8, CLASSES) and torch.allclose(targets.sum(1), torch.ones(8))
        # mixed = lam x + (1 - lam) x.roll(1): recover lam from the pixels, compare with the targets' mass
        lam = ((mixed - x.roll(1, 0)) / (x - x.roll(1, 0))).median().item()
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5, rtol=0)
        expected = lam * F.one_hot(y, CLASSES) + (1 - lam) * F.one_hot(y.roll(1, 0), CLASSES)
        torch.testing.assert_close(targets, expected.float(), atol=1e-4, rtol=0)
        lams.append(lam)
    # the law: Beta(alpha, alpha) (Kolmogorov-Smirnov; p < 1e-3 would be a wrong law, not bad luck)
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-3  # and the test can tell another alpha


def test_cutmix_target_mass_equals_the_pasted_area_and_probabilities_follow_the_config():
    mixer = BatchMixer(CLASSES, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.6, switch_prob=0.25, seed=2)
    kinds = {"none": 0, "mixup": 0, "cutmix": 0}
    for step in range(600):
        x, y = _batch(seed=step)
        y = torch.arange(8) % CLASSES  # distinct neighbours: the rolled label's mass is visible
        mixed, targets = mixer(x, y, step)
        if targets.ndim == 1:
            assert torch.equal(mixed, x) and torch.equal(targets, y)
            kinds["none"] += 1
            continue
        assert torch.allclose(targets.sum(1), torch.ones(8))
        from_other = (mixed == x.roll(1, 0)).all(dim=1) & (mixed != x).any(dim=1)  # pixels pasted from the neighbour
        is_box = ((mixed == x) | (mixed == x.roll(1, 0))).all()
        if is_box:  # CutMix: pixels are copied, not blended; the neighbour's label mass is the pasted area
            area = from_other[0].float().mean().item()
            assert targets[0, y.roll(1, 0)[0]].item() == pytest.approx(area, abs=1e-6)
            kinds["cutmix"] += 1
        else:
            kinds["mixup"] += 1
    n, mixed_n = 600, kinds["mixup"] + kinds["cutmix"]
    assert abs(mixed_n - 0.6 * n) < 4 * (n * 0.6 * 0.4) ** 0.5  # mix_prob, within 4 standard deviations
    assert abs(kinds["cutmix"] - 0.25 * mixed_n) < 4 * (mixed_n * 0.25 * 0.75) ** 0.5  # switch_prob


def test_mixing_is_a_function_of_the_step_and_leaves_the_global_rng_alone():
    mixer = BatchMixer(CLASSES, mixup_alpha=1.0, cutmix_alpha=1.0, seed=3)
    x, y = _batch()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, again, other = mixer(x, y, 5), mixer(x, y, 5), mixer(x, y, 6)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert BatchMixer(CLASSES, mixup_alpha=0, cutmix_alpha=0)(x, y, 0) == (x, y)  # off: untouched


def test_label_smoothing_is_f_cross_entropys_also_on_mixed_targets():
    logits, y = torch.randn(16, CLASSES, dtype=torch.float64), torch.randint(0, CLASSES, (16,))
    for eps in (0.0, 0.1, 0.3):
        torch.testing.assert_close(classification_loss(logits, y, eps), F.cross_entropy(logits, y, label_smoothing=eps))
        # a mixed target: the loss is linear in the target, so it is the lam-weighted pair of smoothed losses
        lam, other = 0.3, y.roll(1)
        soft = lam * F.one_hot(y, CLASSES).double() + (1 - lam) * F.one_hot(other, CLASSES).double()
        expected = lam * F.cross_entropy(logits, y, label_smoothing=eps) + (1 - lam) * F.cross_entropy(
            logits, other, label_smoothing=eps)
        torch.testing.assert_close(classification_loss(logits, soft, eps), expected)
        # and what smoothing means: targets (1 - eps) one-hot + eps / C
        smoothed = (1 - eps) * F.one_hot(y, CLASSES).double() + eps / CLASSES
        torch.testing.assert_close(classification_loss(logits, y, eps),
                                   -(smoothed * logits.log_softmax(1)).sum(1).mean())


class _Tiny(nn.Module):
    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_gradient_clipping_bounds_the_norm_and_reports_it_before_clipping(clip):
    torch.manual_seed(0)
    model = Classifier(_Tiny(), CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the gradients are looked at
    x, y = _batch(16)
    loss, norm = finetune_step(model, optimizer, x * 50, y, 0.0, loss_fn=classification_loss, grad_clip=clip,
                               dtype=torch.float32).tolist()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert norm > 0.05 * 2 and loss > 0
    if clip:
        assert after <= clip * (1 + 1e-5) and after == pytest.approx(clip, rel=1e-4)
    else:
        assert after == pytest.approx(norm, rel=1e-5)


def test_the_ema_equals_its_formula_for_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    model, decay = _Tiny(), 0.8
    ema = weight_average(model, decay)
    expected = None
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3, 8, 8))  # moves the batch-norm running statistics
        ema.update_parameters(model)
        current = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        expected = current if expected is None else {k: decay * expected[k] + (1 - decay) * current[k]
                                                     for k in current}
    averaged = ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6)
    assert weight_average(model, 0.0) is None


def test_layer_decay_scales_vit_blocks_geometrically_and_keeps_the_head_at_the_full_lr():
    from models import create_encoder

    model = Classifier(create_encoder("vit_tiny"), CLASSES)
    decay, depth = 0.5, len(model.encoder.blocks)
    optimizer = create_optimizer("adamw", model, lr=1.0, weight_decay=0.05, layer_decay=decay)
    set_lr(optimizer, 2.0)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter in exactly one group
    assert lr_of[id(named["head.weight"])] == (2.0, 0.05) and lr_of[id(named["head.bias"])] == (2.0, 0.0)
    for i in (0, 5, depth - 1):  # block i (from 0) of depth: lr x decay^(depth - 1 - i); 1-d parameters undecayed
        assert lr_of[id(named[f"encoder.blocks.{i}.attn.qkv.weight"])] == (2.0 * decay ** (depth - 1 - i), 0.05)
        assert lr_of[id(named[f"encoder.blocks.{i}.norm1.weight"])][1] == 0.0
    assert lr_of[id(named["encoder.patch_embed.proj.weight"])][0] == pytest.approx(2.0 * decay ** depth)  # the stem
    assert lr_of[id(named["encoder.pos_embed"])][1] == 0.0  # tokens are not decayed
    with pytest.raises(ValueError, match="needs a ViT encoder"):
        create_optimizer("adamw", Classifier(_Tiny(), CLASSES), lr=1.0, weight_decay=0.0, layer_decay=0.5)


@pytest.mark.parametrize("args, fragment", [
    (["eval.mode=linear", "train.mixup_alpha=0.8"], "train.mixup_alpha apply to eval.mode=finetune only"),
    (["eval.mode=knn", "train.ema_decay=0.99", "optim.layer_decay=0.7"],
     "train.ema_decay, optim.layer_decay apply to eval.mode=finetune and distill only"),
    (["eval.mode=finetune", "optim.layer_decay=0.7"], "optim.layer_decay applies to ViTs"),
    (["eval.mode=finetune", "train.ema_decay=1.0"], "train.ema_decay=1.0 must be < 1"),
    (["eval.mode=finetune", "train.mix_prob=1.5"], "train.mix_prob=1.5 is out of range"),
    (["eval.mode=finetune", "train.mix_prob=0.5"], "train.mix_prob=0.5 has no effect without"),
    (["eval.mode=finetune", "train.mixup_alpha=0.8", "train.cutmix_switch_prob=0.9"],
     "train.cutmix_switch_prob=0.9 chooses between MixUp and CutMix: it needs both"),
])
def test_toolkit_misuse_is_refused_before_anything_runs(tmp_path, args, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        finetune_entry.main(["checkpoint=none", "model.arch=resnet18", "data.name=synthetic", "device=cpu",
                             "wandb.mode=disabled", f"run.dir={tmp_path}", *args])
    assert list(tmp_path.iterdir()) == []
