"""Typed settings from flat key/value sources (TOML run-config, CLI flags, dicts): the machinery.
The settings themselves (`Settings`, one dataclass per concern) are declared in `config.py`.

Every concern (model, MoPs, data, training, ...) is one frozen dataclass. Its fields are the
settings' names in snake_case; users may write them in kebab-case, as Flower's run-config
does. Values arrive as TOML scalars or as CLI strings and are coerced to the field's type
here, once, so that the rest of the code only ever sees validated dataclasses. Every error
names the key that caused it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type, or has an impossible value."""


def setting_error(key: str, problem: str) -> SettingsError:
    return SettingsError(f"setting '{key.replace('_', '-')}': {problem}")


def normalise_key(key: str) -> str:
    return key.strip().replace("-", "_")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML scalar or a CLI string to the field's annotated type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise setting_error(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(key, args[0], value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise setting_error(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise setting_error(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise setting_error(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise setting_error(key, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise setting_error(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise setting_error(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported settings type {hint!r} for '{key}'")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build(cls: type[T], values: Mapping[str, Any], *, context: str = "") -> T:
    """Build one settings dataclass from a mapping; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    known = set(field_names(cls))
    kwargs = {}
    for raw_key, value in values.items():
        key = normalise_key(raw_key)
        if key not in known:
            raise unknown_key_error(raw_key, known, context)
        kwargs[key] = _coerce(key, hints[key], value)
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ that forgot to name its key
        raise SettingsError(f"{context or cls.__name__}: {exc}") from exc


def unknown_key_error(raw_key: str, known: Iterable[str], context: str = "") -> SettingsError:
    known_kebab = sorted(k.replace("_", "-") for k in known)
    close = difflib.get_close_matches(raw_key.replace("_", "-"), known_kebab, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = f" for {context}" if context else ""
    return SettingsError(f"unknown setting '{raw_key}'{where}{hint}")


def split_by_owner(values: Mapping[str, Any], owners: Mapping[str, type], *, context: str = "") -> dict[str, dict]:
    """Route each flat key to the dataclass that declares it.

    `owners` maps a concern's name to its dataclass; field names must be unique across them,
    which `check_unique_fields` enforces at import time of the caller.
    """
    field_owner = {name: concern for concern, cls in owners.items() for name in field_names(cls)}
    routed: dict[str, dict] = {concern: {} for concern in owners}
    for raw_key, value in values.items():
        key = normalise_key(raw_key)
        if key not in field_owner:
            raise unknown_key_error(raw_key, field_owner, context)
        routed[field_owner[key]][key] = value
    return routed


def check_unique_fields(owners: Mapping[str, type]) -> None:
    seen: dict[str, str] = {}
    for concern, cls in owners.items():
        for name in field_names(cls):
            if name in seen:
                raise TypeError(f"setting '{name}' is declared by both {seen[name]} and {concern}")
            seen[name] = concern


def to_flat_dict(*configs: Any) -> dict[str, Any]:
    """The inverse of `build`: kebab-case keys, plain values (for JSON and run-config)."""
    flat: dict[str, Any] = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            flat[f.name.replace("_", "-")] = getattr(cfg, f.name)
    return flat


def add_cli_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> None:
    """Expose a settings dataclass as `--kebab-case` flags.

    Flags are parsed as strings with no default, so the dataclass's own defaults and
    validation stay the single source of truth (see `cli_values`).
    """
    group = parser.add_argument_group(cls.__name__)
    skipped = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            continue
        doc = (f.metadata or {}).get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar="VALUE",
            help=f"{doc} (default: {default!r})" if doc else f"(default: {default!r})",
        )


def cli_values(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of `cls` that the user actually gave."""
    return {
        name: getattr(namespace, name)
        for name in field_names(cls)
        if getattr(namespace, name, None) is not None
    }


def field(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclasses.field
    """A dataclass field with a help text shown by the CLI."""
    return dataclasses.field(default=default, metadata={"help": help})


def describe(owners: Mapping[str, type], changed: Mapping[str, Any] | None = None) -> list[tuple[str, str, str, str, str]]:
    """(concern, key, default, changed value or '', help) for every setting, in declaration order."""
    changed = changed or {}
    rows = []
    for concern, cls in owners.items():
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            rows.append((concern, key, repr(f.default), repr(changed[key]) if key in changed else "", (f.metadata or {}).get("help", "")))
    return rows


def markdown(owners: Mapping[str, type], changed: Mapping[str, Any], *, header: str) -> str:
    """Every setting as one Markdown table per concern (docs/settings.md is this, generated)."""
    lines = [header.rstrip(), ""]
    current = None
    for concern, key, default, demo, help_text in describe(owners, changed):
        if concern != current:
            current = concern
            doc = (owners[concern].__doc__ or "").strip().splitlines()[0]
            lines += ["", f"## {concern}", "", doc, "", "| setting | default | demo | what it does |", "|---|---|---|---|"]
        cell = help_text.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {f'`{demo}`' if demo else ''} | {cell} |")
    return "\n".join(lines) + "\n"
