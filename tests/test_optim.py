import copy

import pytest
import torch
from timm.optim import Lars as TimmLars

from optim.lars import Lars
from optim.optimizers import create_optimizer, effective_lr, lr_at, param_groups, restarted_lr_at, set_lr
from models import create_encoder, projection_head


def test_effective_lr_scales_with_the_global_batch():
    assert effective_lr(1.0, 256) == 1.0 and effective_lr(0.3, 4096) == pytest.approx(4.8)


def test_warmup_then_cosine():
    kw = dict(peak_lr=2.0, warmup_steps=10, total_steps=110, min_lr=0.0)
    assert lr_at(0, **kw) == pytest.approx(0.2)
    assert lr_at(9, **kw) == pytest.approx(2.0)
    assert lr_at(10, **kw) == pytest.approx(2.0)
    assert lr_at(60, **kw) == pytest.approx(1.0)
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(110, **{**kw, "min_lr": 0.1}) == pytest.approx(0.1)
    assert lr_at(37, **kw) == lr_at(37, **kw)  # pure: no hidden state


def test_no_warmup():
    assert lr_at(0, peak_lr=1.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_norm_and_bias_parameters_are_not_decayed_or_adapted():
    enc = create_encoder("resnet18", width=4)
    model = torch.nn.Sequential(enc, projection_head(enc.feature_dim, 16, 8))
    decay, no_decay = param_groups(model, 1e-6)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and not no_decay["always_adapt"] and decay["always_adapt"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_vit_tokens_are_not_decayed():
    vit = create_encoder("vit_tiny")
    decay, no_decay = param_groups(vit, 0.05)
    assert any(p is vit.pos_embed for p in no_decay["params"]) and any(p is vit.cls_token for p in no_decay["params"])


@pytest.mark.parametrize("name, cls", [("lars", Lars), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_create_optimizer(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = create_optimizer(name, model, lr=0.1, weight_decay=1e-4)
    assert isinstance(opt, cls) and len(opt.param_groups) == 2


def test_lars_adapts_weights_but_not_biases_even_without_weight_decay():
    lin = torch.nn.Linear(3, 2)
    opt = create_optimizer("lars", lin, lr=1.0, weight_decay=0.0, momentum=0.0)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.ones_like(lin.weight), torch.ones_like(lin.bias)
    opt.step()
    trust = 1e-3 * w0.norm() / torch.ones_like(w0).norm()  # LARS: lr x trust_coeff x |w| / |g|
    torch.testing.assert_close(lin.weight.detach(), w0 - trust)
    torch.testing.assert_close(lin.bias.detach(), b0 - 1.0)


@pytest.mark.parametrize("options", [{}, {"trust_clip": True}, {"nesterov": True}, {"dampening": 0.1},
                                     {"momentum": 0.0}, {"weight_decay": 0.0}])
def test_lars_steps_as_timms(options):
    """Ours against timm's Lars (the library it replaces at start-up), five steps of random gradients over an adapted
    group, a plain one and one with an all-zero weight: the same parameters and momentum buffers, bit for bit."""
    def groups(model):
        return [{"params": [model[0].weight, model[2].weight], "always_adapt": True},
                {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "always_adapt": False}]

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    torch.nn.init.zeros_(ours[2].weight)  # |w| = 0: left unscaled
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)
    settings = {"lr": 0.3, "momentum": 0.9, "weight_decay": 1e-2, "trust_coeff": 0.02, **options}
    optimizers = Lars(groups(ours), **settings), TimmLars(groups(theirs), **settings)
    for step in range(5):
        grads = [torch.randn_like(p) * 10 ** (step - 2) for p in ours.parameters()]
        for model, optimizer in zip((ours, theirs), optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
        assert ("momentum_buffer" in optimizers[0].state[a]) == (settings["momentum"] != 0)
        if settings["momentum"]:
            assert torch.equal(optimizers[0].state[a]["momentum_buffer"], optimizers[1].state[b]["momentum_buffer"])
    assert all(not torch.equal(a, b) for a, b in zip(ours.parameters(), start.parameters()))  # every tensor moved
    optimizers[0].load_state_dict(optimizers[1].state_dict())  # timm's checkpoints load


def test_decay_norm_bias_decays_every_parameter_in_one_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    (group,) = param_groups(model, 5e-4, decay_norm_bias=True)  # SGD(model.parameters(), weight_decay=5e-4)
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == 4


def test_own_group_takes_its_prefix_and_set_lr_scales_it():
    from optim.optimizers import set_lr

    model = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "classifier": torch.nn.Linear(4, 2)})
    opt = create_optimizer("sgd", model, lr=1.0, weight_decay=1e-4,
                           own_groups={"classifier.": {"weight_decay": 0.0, "lr_scale": 0.25}})
    decay, no_decay, own, own_bias = opt.param_groups
    assert own["params"] == [model["classifier"].weight] and own_bias["params"] == [model["classifier"].bias]
    assert own["weight_decay"] == own_bias["weight_decay"] == 0.0 and own_bias["lr_scale"] == 0.25
    assert decay["params"] == [model["body"].weight] and no_decay["params"] == [model["body"].bias]
    set_lr(opt, 0.4)
    assert (decay["lr"], no_decay["lr"], own["lr"], own_bias["lr"]) == (0.4, 0.4, 0.1, 0.1)


def test_online_classifier_under_lars_steps_as_solo_learn():
    """solo-learn (solo/utils/lars.py, scripts/pretrain/cifar/simclr.yaml: eta 0.02, clip_lr, exclude_bias_n_norm)
    passes the online classifier through its LARS with weight decay 0: the weight's step is lr x min(eta |w| / (|g| lr),
    1) x g, the bias a plain SGD step at the classifier's lr. Written out here from their code, one step."""
    from configs.load import load_config
    from training.pretraining import build_model, build_optimizer

    cfg = load_config(["model.width=4", "eval.online_linear=true", "eval.online_lr=0.1", "optim.base_lr=0.4",
                       "optim.lars_trust_coeff=0.02", "optim.lars_trust_clip=true", "train.batch_size=256",
                       "optim.weight_decay=1e-4"])
    model = build_model(cfg, torch.device("cpu"), num_classes=10)
    optimizer, _ = build_optimizer(cfg, model, steps_per_epoch=10)
    lr = 0.1  # eval.online_lr x 256 / 256: the classifier's lr
    set_lr(optimizer, 0.4)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    w, b = model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    gw, gb = model.classifier.weight.grad.clone(), model.classifier.bias.grad.clone()
    optimizer.step()
    ratio = min(0.02 * w.norm().item() / (gw.norm().item() + 1e-8) / lr, 1.0)
    torch.testing.assert_close(model.classifier.weight.detach(), w - lr * ratio * gw)
    torch.testing.assert_close(model.classifier.bias.detach(), b - lr * gb)
    assert ratio < 1  # the adaptation did something


def test_a_restarted_schedule_runs_each_segment_as_a_run_of_its_own():
    schedule = dict(peak_lr=1.0, warmup_steps=2, min_lr=0.0)
    whole = [lr_at(s, total_steps=10, **schedule) for s in range(10)]
    extended = [restarted_lr_at(s, restart_steps=[10], total_steps=16, **schedule) for s in range(16)]
    assert extended[:10] == whole
    assert extended[10:] == [lr_at(s, total_steps=6, peak_lr=1.0, warmup_steps=0) for s in range(6)]  # 6 // 10 = 0
    longer = [restarted_lr_at(s, restart_steps=[10], total_steps=40, **schedule) for s in range(40)]
    assert longer[10:] == [lr_at(s, total_steps=30, **schedule) for s in range(30)]  # warm-up again, then cosine
    assert restarted_lr_at(3, restart_steps=[], total_steps=10, **schedule) == whole[3]


def test_a_restarted_segment_no_longer_than_its_warm_up_still_ends_annealed():
    """2 -> 3 epochs of 40 steps with 1 warm-up epoch: the added segment was all warm-up and ended at the peak.
    Its warm-up now takes at most a tenth of it (4 steps), and it ends at the cosine's end, as every segment does."""
    schedule = dict(peak_lr=0.39, warmup_steps=40, min_lr=0.0)
    segment = [restarted_lr_at(s, restart_steps=[80], total_steps=120, **schedule) for s in range(80, 120)]
    assert segment[:4] == pytest.approx([0.39 * k / 4 for k in (1, 2, 3, 4)])
    assert max(segment) == pytest.approx(0.39) and segment[-1] < 0.01 * 0.39
    assert segment == [lr_at(s, total_steps=40, peak_lr=0.39, warmup_steps=4) for s in range(40)]
    first = [restarted_lr_at(s, restart_steps=[80], total_steps=120, **schedule) for s in range(80)]
    assert first == [lr_at(s, total_steps=80, **schedule) for s in range(80)]  # the first segment as configured
