"""The configs of the training loops: one dataclass per loop, filled from a YAML recipe, command-line flags and
`--set key=value` overrides (`--set model.clone_batch=8` sets a key inside a mapping field).

`PretrainConfig` and `FinetuneConfig` subclass `RecipeConfig`; their field annotations are the whole schema: a
value is turned into the annotated type (`5e-4` -> float, `a,b` -> list, `[0.9, 0.95]` -> tuple), and a key the
dataclass does not have is an error that lists the valid ones. Flags come from the same fields
(`add_config_arguments`: `--max-steps` for `max_steps`, `--lora/--no-lora` for a bool), so a flag, a recipe key and a
`--set` key are one name with one type.

Why not OmegaConf or `HfArgumentParser` (both tried on these two configs): OmegaConf 2.3 reads
`mixed_precision: no` as the string "False" and refuses the `datasets.Dataset` or encoder objects that the Python
API accepts as `data` / `rr_encoder`; `HfArgumentParser` refuses `validation_size: float | int`, has no dotted
overrides, and costs a second of imports. What both loops need fits in this file.

Recipes are read as YAML 1.2 scalars: only true/false are booleans (`mixed_precision: no`, `collapse_guard: off`
stay words) and `5e-4` is a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .files import json_safe

#: Packaged recipes: `recipes/pretrain_tiny.yaml` is `--config tiny` of `cat-hf pretrain`.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
#: A value resolved when the run starts (`rr_embedding_dim: auto`, `loss: auto`, ...).
AUTO = "auto"


class ConfigError(ValueError):
    """A setting is unknown or has a value of the wrong kind; the message names it and the fix."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans and floats (PyYAML follows YAML 1.1 there)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
                       r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def resolve_recipe(name_or_path: str | os.PathLike, prefix: str) -> Path:
    """A YAML file, or a packaged recipe by name: `tiny` (or `pretrain_tiny`, `tiny.yaml`) ->
    recipes/pretrain_tiny.yaml when `prefix` is "pretrain_"."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    stem = text.removesuffix(".yaml").removesuffix(".yml")
    for candidate in (RECIPES_DIR / f"{prefix}{stem}.yaml", RECIPES_DIR / f"{stem}.yaml"):
        if candidate.is_file() and candidate.name.startswith(prefix):
            return candidate
    raise ConfigError(f"Config {text!r} is neither a YAML file nor a recipe; packaged recipes: "
                      f"{available_recipes(prefix)}.")


def available_recipes(prefix: str) -> list[str]:
    return sorted(p.stem.removeprefix(prefix) for p in RECIPES_DIR.glob(f"{prefix}*.yaml"))


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, YAML value): `lr=5e-4`, `model.clone_batch=8`, `adam_betas=[0.9, 0.95]`, `x=null`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {text!r} must look like key=value (e.g. batch_size=8 or model.clone_batch=2).")
    value = value.strip()
    return key.strip(), load_yaml(value) if value else None


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def fraction_or_count(value: Any) -> float | int:
    """`0.1` -> a fraction, `120` (or `120.0`) -> a count."""
    number = float(value)
    return int(number) if number >= 1 and number.is_integer() else number


# ----------------------------------------------------------------------------------------------------------------
# Values into the annotated types


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """`value` as the annotated type; ConfigError when it cannot be one. None stays None."""
    if value is None or annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if set(options) == {float, int}:
            return fraction_or_count(_coerce(name, value, float))
        return _coerce(name, value, options[0])
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}.")
        return value
    if annotation in (int, float):
        return _number(name, value, annotation)
    if annotation is str:
        if isinstance(value, (bool, list, dict)):
            raise ConfigError(f"{name} must be a word or a path, got {value!r} (quote it in YAML: '{value}').")
        if isinstance(value, (int, float)):
            return str(value)
        return os.fspath(value) if isinstance(value, os.PathLike) else value  # or an in-memory corpus
    if origin is list:
        items = comma_list(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name} must be a list (or comma-separated words), got {value!r}.")
        return [_coerce(name, item, args[0]) for item in items] if args else list(items)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values like [0.9, 0.95], got {value!r}.")
        return tuple(_coerce(name, item, kind) for item, kind in zip(value, args))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping of keys to values, got {value!r}.")
        return dict(value)
    return value


def _number(name: str, value: Any, kind: type) -> int | float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if isinstance(value, str) else value
        if kind is int:
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        return float(number)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, got {value!r}.") from None


def _name_of(value: Any) -> str:
    return getattr(value, "name", None) or repr(value)


# ----------------------------------------------------------------------------------------------------------------
# The base of the loops' configs


class RecipeConfig:
    """Construction, overrides and serialisation shared by the loops' config dataclasses."""

    #: Packaged recipes of this loop are `recipes/<recipe_prefix><name>.yaml`.
    recipe_prefix: ClassVar[str] = ""
    #: How an error names one setting ("pretraining config key", "finetuning setting").
    setting_noun: ClassVar[str] = "setting"
    error: ClassVar[type[ConfigError]] = ConfigError
    #: The YAML copy of the settings a run writes beside its checkpoints (and compares on --resume).
    config_file: ClassVar[str] = "config.yaml"
    #: Settings that may differ between a checkpoint's run and the run resuming it: where things are written, what
    #: is logged, how fast. Every other setting shapes the training state and is compared (`checkpoints`).
    resume_free_settings: ClassVar[frozenset[str]] = frozenset()
    #: Settings holding local paths, compared as resolved paths when a run resumes.
    path_settings: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: str = "the settings"):
        """Build from a mapping (a parsed recipe, flags); unknown keys are an error naming the valid ones."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise cls.error(f"Unknown {cls.setting_noun}(s) {unknown} in {origin}; valid keys are "
                            f"{cls.field_names()}.")
        try:
            return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})
        except ConfigError as error:
            raise cls.error(f"{error} ({origin})") from None

    @classmethod
    def recipe_path(cls, recipe: str | os.PathLike) -> Path:
        """A YAML file, or this loop's packaged recipe of that name (`tiny` -> recipes/<prefix>tiny.yaml)."""
        try:
            return resolve_recipe(recipe, cls.recipe_prefix)
        except ConfigError as error:
            raise cls.error(str(error)) from None

    @classmethod
    def from_yaml(cls, recipe: str | os.PathLike, **overrides: Any):
        """A recipe (a YAML path, or a packaged name like `tiny`) with `overrides` on top."""
        path = cls.recipe_path(recipe)
        values = load_yaml(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise cls.error(f"Recipe {path} must be a YAML mapping of settings (key: value lines), found "
                            f"{type(values).__name__}.")
        return cls.from_dict({**values, **overrides}, origin=f"recipe {path}")

    @classmethod
    def from_any(cls, config: Any):
        """A config, a mapping of settings, or a recipe name / YAML path."""
        if isinstance(config, cls):
            return config
        return cls.from_dict(config) if isinstance(config, Mapping) else cls.from_yaml(config)

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]):
        """A copy with `key=value` strings (or a mapping) applied; `field.key` sets a key of a mapping field."""
        values = self.to_dict(serialisable=False)
        items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
        for key, value in items:
            field, _, inner = key.partition(".")
            if inner and isinstance(values.get(field), dict):
                values[field] = {**values[field], inner: value}
            else:
                values[key] = value
        return type(self).from_dict(values, origin="the overrides")

    def to_dict(self, serialisable: bool = True) -> dict[str, Any]:
        """{setting: value}; `serialisable`: a YAML/JSON-ready view (tuples as lists, paths as strings, an in-memory
        corpus or encoder object by its name)."""
        values = {name: getattr(self, name) for name in self.field_names()}
        values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
        return json_safe(values, default=_name_of) if serialisable else values

    def state_settings(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """{setting: value} of what shapes the training state (of this config, or of a saved config's `values`):
        mapping fields flattened to `field.key`, local paths resolved."""
        flat: dict[str, Any] = {}
        for key, value in (self.to_dict() if values is None else values).items():
            if key in self.resume_free_settings:
                continue
            if isinstance(value, Mapping):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
                continue
            if key in self.path_settings and isinstance(value, str) and Path(value).expanduser().exists():
                value = os.path.realpath(Path(value).expanduser())
            flat[key] = list(value) if isinstance(value, tuple) else value
        return flat


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[RecipeConfig],
                         flag_groups: Mapping[str, Mapping[str, str | None]], *, recipe_required: bool = False,
                         choices: Mapping[str, Sequence[str]] | None = None) -> None:
    """A loop's command line: `--config RECIPE`; a flag per field named in `flag_groups` (group title -> {field:
    help}), typed from the field: `--max-steps N`, `--lora/--no-lora`, `--labels a,b`; and `--resume`,
    `--allow-changed`, `--set KEY=VALUE` for everything else. A flag left out keeps the recipe's value (its default
    is argparse.SUPPRESS)."""
    parser.add_argument("--config", required=recipe_required, default=None, metavar="RECIPE",
                        help=f"recipe name ({', '.join(available_recipes(config_class.recipe_prefix))}) or a YAML file")
    hints = typing.get_type_hints(config_class)
    for title, flags in flag_groups.items():
        group = parser.add_argument_group(title)
        for name, help_text in flags.items():
            kind = hints[name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):
                options = [a for a in typing.get_args(kind) if a is not type(None)]
                kind = fraction_or_count if set(options) == {float, int} else options[0]
            kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(kind) is list:
                kwargs["type"] = comma_list
            elif kind in (int, float, fraction_or_count):
                kwargs["type"] = kind
            if choices and name in choices:
                kwargs["choices"] = choices[name]
            group.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    group = parser.add_argument_group("resume and other settings")
    group.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS,
                       help="continue from the newest complete checkpoint in --output-dir (or 'auto': if there is "
                            "one; or a checkpoint folder)")
    group.add_argument("--allow-changed", dest="resume_allow_changed", type=comma_list, metavar="KEY[,KEY...]",
                       default=argparse.SUPPRESS,
                       help="with --resume: continue the checkpoint's state although these settings differ from the "
                            "run that wrote it (e.g. max_steps,batch_size)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set learning_rate=1e-4 (--set model.clone_batch=8)")


def parse_config(config_class: type[RecipeConfig], args: argparse.Namespace):
    """The recipe of `--config` (or the defaults), then the flags given, then the `--set` overrides."""
    flags = {name: getattr(args, name) for name in config_class.field_names() if hasattr(args, name)}
    recipe = getattr(args, "config", None)
    config = config_class.from_yaml(recipe, **flags) if recipe else config_class.from_dict(flags, "the command line")
    return config.with_overrides(getattr(args, "overrides", None) or [])


__all__ = [
    "AUTO",
    "ConfigError",
    "RECIPES_DIR",
    "RecipeConfig",
    "add_config_arguments",
    "available_recipes",
    "comma_list",
    "fraction_or_count",
    "load_yaml",
    "parse_config",
    "parse_override",
    "resolve_recipe",
]
