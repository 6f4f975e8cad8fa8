import pytest
from omegaconf import OmegaConf

from configs.schema import FinetuneConfig
from configs.load import config_keys, from_dict, load_config, parse_args, to_dict, to_yaml
from configs.schema import PretrainConfig
from core.errors import UserError
from tests.conftest import REPO

CONTRACT_KEYS = """seed device data.name data.root data.download data.val_size data.train_limit model.arch model.width
model.proj_dim model.proj_layers loss.temperature loss.impl aug.strength train.epochs train.batch_size train.precision
train.compile optim.name optim.base_lr optim.weight_decay optim.warmup_epochs eval.knn_every run.dir run.name
run.resume run.ckpt_every wandb.mode wandb.project wandb.group wandb.entity wandb.tags wandb.name wandb.notes""".split()


def test_schema_carries_every_contract_key():
    assert set(CONTRACT_KEYS) <= set(config_keys(PretrainConfig))


def test_defaults_are_the_resnet18_recipe():
    cfg = load_config([])
    recipe = (cfg.model.arch, cfg.train.batch_size, cfg.loss.temperature, cfg.optim.name)
    assert recipe == ("resnet18", 512, 0.5, "lars")
    assert cfg.aug.strength == 0.5 and cfg.aug.blur_prob == 0.0


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  batch_size: 64\nmodel:\n  arch: resnet50\n")
    cfg = load_config(["--config", str(f), "train.epochs=9", "wandb.tags=[a,b]", "model.width=null"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.arch, cfg.wandb.tags) == (9, 64, "resnet50", ["a", "b"])
    assert isinstance(cfg, PretrainConfig)


@pytest.mark.parametrize("argv, message", [
    (["train.epoch=3"], "did you mean 'train.epochs'"),
    (["optim.temperature=0.1"], "did you mean 'loss.temperature'"),
    (["train.epochs=ten"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size=0 is out of range"),
    (["train.batch_size=-4"], "out of range"),
    (["loss.temperature=0"], "loss.temperature=0.0 is out of range"),
    (["model.arch=resnet9"], "model.arch='resnet9' is not one of"),
    (["data.name=imagenet"], "data.name='imagenet' is not one of"),
    (["train.epochs"], "has no '='"),
    (["--config"], "needs a file"),
    (["--config", "/no/such/file.yaml"], "does not exist"),
    (["--verbose"], "unknown option"),
    (["aug.gray_prob=1.5"], "out of range"),
])
def test_bad_input_is_a_user_error(argv, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(argv)
    assert message in str(err.value)


def test_malformed_and_unknown_keys_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(["--config", str(bad)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(UserError, match="unknown config key 'trian'"):
        load_config(["--config", str(typo)])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(["--config", str(scalar)])


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(["model.width=16", "wandb.tags=[x]"])
    assert from_dict(to_dict(cfg)) == cfg
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig),
                                               OmegaConf.create(to_yaml(cfg)))) == cfg


def test_parse_args_splits_file_and_overrides():
    assert parse_args(["--config=a.yaml", "x.y=1"]) == ("a.yaml", ["x.y=1"])


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load_and_start_with_launch_command(recipe):
    cfg = load_config(["--config", str(recipe)])
    assert cfg.train.epochs >= 1
    head = recipe.read_text().splitlines()[:4]
    assert any("python pretrain.py --config" in line for line in head)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_finetune_recipes_load_and_start_with_launch_command(recipe):
    cfg = load_config(["--config", str(recipe)], FinetuneConfig)
    assert cfg.eval.mode in ("linear", "finetune", "knn")
    assert any("python finetune.py --config" in line for line in recipe.read_text().splitlines()[:5])


def test_vit_finetune_recipe_uses_the_toolkit():
    cfg = load_config(["--config", str(REPO / "configs/finetune/finetune_vit.yaml")], FinetuneConfig)
    t = cfg.train
    assert (t.mixup_alpha, t.cutmix_alpha, t.label_smoothing, t.grad_clip) == (0.8, 1.0, 0.1, 1.0)
    assert 0 < t.ema_decay < 1 and cfg.optim.name == "adamw" and cfg.optim.layer_decay == 0.75


def test_b9_recipe_matches_the_paper():
    cfg = load_config(["--config", str(REPO / "configs/pretrain/cifar10_resnet50.yaml")])
    recipe = (cfg.model.arch, cfg.train.batch_size, cfg.optim.name, cfg.loss.temperature)
    assert recipe == ("resnet50", 1024, "lars", 0.5)
    assert (cfg.optim.warmup_epochs, cfg.optim.weight_decay, cfg.aug.strength, cfg.aug.blur_prob) == (10, 1e-6, 0.5, 0)
