"""Stage setups <-> command lines and recipes: the one place where a setup's fields become flags.

A stage setup (`DetectorSetup`, `PretrainSetup`, `FinetuneSetup`) is a dataclass whose fields are written
with `option(default, help=...)`. `add_setup_arguments` turns every field into one flag, named after it
(`warmup_steps` -> `--warmup-steps`) unless the option names its own flags, and walks into the dataclasses
a setup embeds (its `TrainConfig`, ...), so every knob is reachable and documented once. Flags default to
"not given": `setup_from_args` starts from the recipe (`--recipe NAME`, a table of configs/STAGE.toml) or
the setup's own defaults and sets only what was typed, so explicit flags always win over a recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from minivlm.errors import MiniVLMError

T = TypeVar("T")

# The recipes: minivlm/configs/ (the repository's configs/ links to it), inside the package so that a
# non-editable install carries them too.
CONFIGS = Path(__file__).resolve().parent / "configs"


def option(default: Any = dataclasses.MISSING, *, help: str, flags: tuple[str, ...] = (),
           choices: tuple | list | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A setup field with its command-line help (and, when they differ from the field's name, its flags)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "flags": tuple(flags), "choices": choices})


# ---------------------------------------------------------------------------------------------- recipes


def recipe_names(stage: str) -> list[str]:
    path = CONFIGS / f"{stage}.toml"
    return list(tomllib.loads(path.read_text())) if path.is_file() else []


def load_recipe(stage: str, name: str) -> dict:
    """The recipe NAME of configs/STAGE.toml, or a TOML file of one recipe, as nested field values."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        data = tomllib.loads(path.read_text())
    else:
        table = tomllib.loads((CONFIGS / f"{stage}.toml").read_text()) if (CONFIGS / f"{stage}.toml").is_file() else {}
        if name not in table:
            raise MiniVLMError(f"unknown {stage} recipe {name!r}; choose one of: {', '.join(table) or 'none'} "
                               f"({CONFIGS / f'{stage}.toml'}), or give a .toml file")
        data = table[name]
    data.pop("source", None)  # the citation, for readers
    return data


def setup_from_recipe(cls: type[T], name: str, **values: Any) -> T:
    """`cls` from its recipe NAME with `values` on top (nested: `train={"lr": 1e-4}`)."""
    return build(cls, _merge(load_recipe(cls.RECIPES, name), values))


# ---------------------------------------------------------------------------------------------- building


def build(cls: type[T], values: dict) -> T:
    """A setup from nested field values (a recipe, parsed flags, Python keywords). Embedded dataclasses
    start from the setup's own default (so a stage keeps its recipe for every field not given)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise MiniVLMError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}")
    flat, nested = {}, {}
    for name, value in values.items():
        hint = _plain(hints[name])
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            nested[name] = (hint, value)
        else:
            flat[name] = _convert(hint, value)
    missing = [n for n, f in fields.items() if n not in flat and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MiniVLMError(f"{' '.join(_flags(fields[n])[0] for n in missing)} required")
    setup = cls(**flat)
    for name, (hint, sub) in nested.items():
        current = getattr(setup, name)
        inner = build(hint, {**(dataclasses.asdict(current) if current is not None else {}), **sub})
        setup = dataclasses.replace(setup, **{name: inner})
    return setup


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _plain(hint: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(hint) is dict and isinstance(value, list):  # repeated KEY=VALUE flags
        return dict(value)
    return value


# ---------------------------------------------------------------------------------------------- flags


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _or_none(kind: type):
    """For an optional number or path, the word 'none' on the command line gives None."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_setup_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--recipe` and one flag per field of `cls` (and of the dataclasses it embeds)."""
    names = recipe_names(cls.RECIPES)
    parser.add_argument("--recipe", help=f"start from a recipe of configs/{cls.RECIPES}.toml "
                                         f"({', '.join(names) or 'none yet'}) or a .toml file; flags override it")
    _add_fields(parser, parser, cls, "", None)


def _add_fields(parser, group, cls: type, prefix: str, defaults: Any) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = _plain(hints[f.name])
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        if dataclasses.is_dataclass(hint):
            sub = parser.add_argument_group(f"{f.name} ({hint.__name__})", f.metadata.get("help"))
            _add_fields(parser, sub, hint, prefix + f.name + ".", default)
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: a setup field needs option(..., help=...)")
        shown = "" if default in (None, dataclasses.MISSING) else f" (default: {default})"
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS,
                              "help": f.metadata["help"] + shown}
        if default is dataclasses.MISSING:
            kw["help"] += " (required)"
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kw.update(action="append", type=typing.get_args(hint)[0], metavar=f.name.upper().rstrip("S"))
        elif typing.get_origin(hint) is dict:
            kw.update(action="append", type=_key_value, metavar="KEY=VALUE")
        else:
            optional = hint is not hints[f.name] and hint is not str
            kw.update(type=_or_none(hint) if optional else hint, choices=f.metadata.get("choices"))
            if not kw["choices"]:
                kw["metavar"] = f.name.upper()
        group.add_argument(*_flags(f), **kw)


def setup_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The setup the command line asks for: recipe (if any), then every flag that was given."""
    values: dict = {}
    for dest, value in vars(args).items():
        if dest in ("command", "recipe"):
            continue
        *path, name = dest.split(".")
        node = values
        for part in path:
            node = node.setdefault(part, {})
        node[name] = value
    base = load_recipe(cls.RECIPES, args.recipe) if getattr(args, "recipe", None) else {}
    return build(cls, _merge(base, values))
