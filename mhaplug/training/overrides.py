"""The command line's Hydra overrides, checked before Hydra composes ``configs/``: the one check that ``train.py`` and
``python -m mhaplug.show`` share, so that both take the same overrides and refuse the same ones in one line.

Hydra alone refuses ``logger=null`` when it composes (a group's option must be a name) and prints a multi-line error
for an unknown option or a value of the wrong type (``trainer.max_steps=abc``); :func:`check_overrides` turns the
first into Hydra's ``~logger`` and the others into a :class:`~mhaplug.common.ConfigError` naming the key, the value
and what it takes.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mhaplug.common import ConfigError
from mhaplug.training.config import choice_of, schema_field

__all__ = ["CONFIGS", "check_overrides"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's config tree, beside train.py
_OWN_CONFIGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")  # another config tree
_NOT_CHECKED = {"hydra"}  # Hydra's own groups (hydra/launcher=...) live in its package, not under configs/


def check_overrides(args: Sequence[str], configs: Path = CONFIGS) -> list[str]:
    """The command line's overrides checked before Hydra runs: a ``group=option`` against ``configs/<group>/*.yaml``,
    a ``key=value`` of a choice (``data.layout``, typed by :class:`mhaplug.common.Choice` in the schema) against its
    values, and of any other typed setting against its type (``trainer.max_steps`` takes an int). A bad one (also one
    value of a sweep, ``attention=auto,fast``) raises :class:`ConfigError` naming the key, the value and what is
    allowed: Hydra would print a multi-line error and exit 1. Returns ``args``, with
    ``group=null`` (drop the group, as ``logger=null`` reads) written as Hydra spells it, ``~group``, and ``+key=value``
    for a key of the schema (which Hydra would refuse as already there) as ``key=value``. Left to Hydra:
    a run with another config tree (``--config-dir`` ...) and an override Hydra's grammar rejects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    if any(arg.split("=", 1)[0] in _OWN_CONFIGS for arg in args):
        return list(args)
    groups = {d.name for d in configs.iterdir() if d.is_dir() and d.name not in _NOT_CHECKED}
    parser, checked = OverridesParser.create(), []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            checked.append(arg)
            continue
        try:
            override = parser.parse_override(arg)
        except OverrideParseException:
            checked.append(arg)  # Hydra reports it
            continue
        group = override.key_or_group
        if override.is_delete() or override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            checked.append(arg)  # a glob matches existing options only
            continue
        if group not in groups:
            _check_choice_override(override)
            _check_typed_override(override)
            # +key=value adds a key, and Hydra refuses it for a key the schema always has (+trainer.precision=...,
            # once the only way to set it): the plain override sets it
            checked.append(arg[1:] if override.is_add() and schema_field(group) is not None else arg)
            continue
        if not override.is_sweep_override() and override.value() is None:
            checked.append(f"~{group}")  # group=null: no config of this group
            continue
        options = sorted(p.stem for p in (configs / group).glob("*.yaml"))
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if str(value) not in options:
                raise ConfigError(
                    f"{group}={value} is not an option of {group}; allowed: {', '.join(options)} "
                    f"(the files in configs/{group}/)"
                )
        checked.append(arg)
    return checked


def _check_choice_override(override: Any) -> None:
    choice = choice_of(override.key_or_group)
    if choice is None:
        return
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    for value in values:
        if value not in choice.values():
            hint = " (or pick one with attention=NAME)" if override.key_or_group == "attention.strategy" else ""
            raise ConfigError(
                f"{override.key_or_group}={value} is not valid; allowed: {', '.join(choice.values())}{hint}"
            )


_TYPE_WORDS = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string", type(None): "null"}


def _check_typed_override(override: Any) -> None:
    """A value OmegaConf would refuse for its schema field when Hydra composes, refused here in one line."""
    from omegaconf import OmegaConf, ValidationError

    found = schema_field(override.key_or_group)
    if found is None:
        return
    schema, name = found
    try:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001 - an interval() sweep has no values to list: Hydra checks each job's
        return
    node = OmegaConf.structured(schema)
    for value in values:
        try:
            node[name] = value  # the conversion Hydra's composition does (an int field takes 7 and "7")
        except ValidationError:
            hint = typing.get_type_hints(schema)[name]
            kinds = typing.get_args(hint) or (hint,)
            words = [_TYPE_WORDS.get(kind, getattr(kind, "__name__", str(kind))) for kind in kinds]
            takes = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
            shown = "null" if value is None else value
            raise ConfigError(
                f"{override.key_or_group}={shown} is not valid; {override.key_or_group} takes {takes}"
            ) from None
