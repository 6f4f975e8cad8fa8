"""Build the typed config: schema defaults <- YAML file (--config) <- key=value overrides, then validate.

Every failure here is a :class:`rundir.cli.UserError` naming the key, the bad value and, for misspelt keys,
the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Type, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from configs.schema import CHOICES, RANGES, RESUMABLE_CHANGES, PretrainConfig
from core.errors import Answered, UserError

T = TypeVar("T")


def parse_args(argv: Sequence[str]) -> Tuple[str | None, list[str]]:
    """Split the command line into an optional ``--config FILE`` and ``key=value`` overrides."""
    config_file, overrides = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c"):
            if not args:
                raise UserError("--config needs a file path")
            config_file = args.pop(0)
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r}; expected --config FILE and key=value overrides (see --help)")
        elif "=" not in arg:
            raise UserError(f"override {arg!r} has no '='; write it as key=value (for example train.epochs=100)")
        else:
            overrides.append(arg)
    return config_file, overrides


def config_keys(schema: Type) -> list[str]:
    """All dotted leaf keys of a dataclass schema, e.g. ``['seed', 'data.name', ...]``."""
    keys = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += [f"{f.name}.{k}" for k in config_keys(type(default))]
        else:
            keys.append(f.name)
    return keys


def load_config(argv: Sequence[str], schema: Type[T] = PretrainConfig, prog: str = "") -> T:
    """Parse ``[--config FILE] [key=value ...]`` into a validated instance of ``schema``.

    ``--help [SECTION]`` and ``--print-config`` (the resolved config as YAML) raise :class:`core.errors.Answered`
    with the text to print instead: the entrypoint shows it and exits 0 without running.
    """
    argv, help_section, print_config = _questions(argv)
    if help_section is not None:
        from configs.help import help_text  # reads the schema's source: only when asked

        usage = f"usage: python {prog or 'ENTRYPOINT'} [--config FILE] [key=value ...] [--help [SECTION]] [--print-config]"
        raise Answered(help_text(schema, usage, inspect.getdoc(schema) or "", help_section or None))
    config_file, overrides = parse_args(argv)
    cfg = OmegaConf.structured(schema)
    if config_file is not None:
        cfg = _merge(cfg, _read_yaml(config_file), schema, f"in {config_file}: ")
    for item in overrides:
        key, value = item.split("=", 1)
        if not key:
            raise UserError(f"override {item!r} has an empty key")
        cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]), schema, "", key)
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    if print_config:
        raise Answered(to_yaml(obj))
    return obj


def _questions(argv: Sequence[str]) -> Tuple[list[str], Optional[str], bool]:
    """Take ``--help``/``-h`` (with an optional SECTION after it or after ``=``) and ``--print-config`` out of argv:
    (the rest, the section ('' for all; None: no help asked), whether to print the config)."""
    rest, section, print_config = [], None, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--help", "-h"):
            section = args.pop(0) if args and not args[0].startswith("-") and "=" not in args[0] else ""
        elif arg.startswith("--help="):
            section = arg.split("=", 1)[1]
        elif arg == "--print-config":
            print_config = True
        else:
            rest.append(arg)
    return rest, section, print_config


def _read_yaml(path: str) -> DictConfig:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"config file {path!r} does not exist")
    try:
        loaded = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path!r} must hold a mapping of keys, not {type(loaded).__name__}")
    return OmegaConf.create(loaded)


def _merge(cfg: DictConfig, other: DictConfig, schema: Type, where: str, key_hint: str = "?") -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        raise UserError(f"{where}unknown config key {key!r}{_suggestion(key, schema)}") from None
    except OmegaConfBaseException as err:
        key = err.full_key or key_hint
        reason = str(err).splitlines()[0]
        raise UserError(f"{where}bad value for {key!r}: {reason}") from None


def _suggestion(key: str, schema: Type) -> str:
    valid = config_keys(schema)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a right leaf under a wrong section, e.g. `optim.temperature`
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def validate(cfg: Any) -> None:
    """Check allowed values and numeric ranges declared in ``configs.schema``; raise UserError on the first bad key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if allowed and value is not None and value not in allowed:
            raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key, (low, high, low_inclusive) in RANGES.items():
        value = _get(cfg, key)
        if value is None or isinstance(value, bool):
            continue
        too_low = value < low if low_inclusive else value <= low
        too_high = high is not None and value > high
        if too_low or too_high:
            bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise UserError(f"{key}={value} is out of range: it must be {bound}")
    restarts, epochs = _get(cfg, "train.schedule_restarts"), _get(cfg, "train.epochs")
    if restarts and (list(restarts) != sorted(set(restarts)) or restarts[0] <= 0 or restarts[-1] >= epochs):
        raise UserError(f"train.schedule_restarts={list(restarts)} must be increasing epochs between 0 and "
                        f"train.epochs={epochs} (both excluded)")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (what is printed at start and saved as config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain nested dicts (for checkpoints, JSON and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(nested: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: a config (as :func:`to_dict` gives it) by dotted key."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(saved: dict, cfg: Any, schema: Type, also_allowed: Tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key in which ``cfg`` differs from a checkpoint's saved config (``to_dict`` form,
    older files filled with defaults), except those a resumed run may change (``configs.schema.RESUMABLE_CHANGES``
    and ``also_allowed``, which the caller checks itself)."""
    before, now = flatten(to_dict(from_dict(saved, schema))), flatten(to_dict(cfg))
    allowed = RESUMABLE_CHANGES + tuple(also_allowed)
    return [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k] and not k.startswith(allowed)]


def from_dict(data: dict, schema: Type[T] = PretrainConfig) -> T:
    """Rebuild a typed config from :func:`to_dict` output, e.g. the copy saved in a checkpoint."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
