"""Settings, the one way the operator and the agent read them: a component's frozen dataclass, read
once from ``FLOWMAP_<COMPONENT>_<FIELD>`` environment variables (:func:`read`).

The dataclass is the whole description. A field's type says how its variable reads: ``int``,
``float``, ``str``, ``Path``, ``bool`` spelled out (``bool("false")`` is True), ``tuple[str, ...]``
from comma-separated values, a ``Literal`` or an ``Enum`` for a choice; :func:`setting` gives it
bounds. Here rather than in each component because each had its own copy of the reader and they
had drifted; this package is the one both import (it stays a leaf: the standard library only).

A variable of the component's prefix that names no setting is refused, with the nearest name: a
misspelt setting left silently at its default is a cluster that does not do what it was told. The
one exception is what the kubelet sets for a Service of the pod's namespace unless the pod says
``enableServiceLinks: false`` (``pkg/kubelet/envvars``): a Service named
``flowmap-operator-metrics`` sets ``FLOWMAP_OPERATOR_METRICS_PORT`` and the like, and is no
mistake of the user's. No setting may take such a name (``tests/test_settings.py`` checks).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")
T = TypeVar("T")

TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")
# The names the kubelet gives a Service's variables, after the Service's own upper-cased name.
SERVICE_LINK = re.compile(r"[A-Z0-9_]+_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT"
                          r"|PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a setting's value must be; ``why`` is said with any refusal."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    required: bool = False  # not empty
    why: str = ""


def setting(default: T, *, at_least: float | None = None, above: float | None = None, at_most: float | None = None,
            required: bool = False, why: str = "") -> T:
    """A field with its default and its bounds (inclusive ``at_least``/``at_most``, exclusive ``above``;
    ``required``: an empty value is refused), checked by :func:`read`."""
    bounds = Bounds(at_least, above, at_most, required, why)
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def port(default: int) -> int:
    """A field for a port we listen on, 0 to 65535 (what 0 means is the component's to say)."""
    return setting(default, at_least=0, at_most=65535)


def read(cls: type[S], prefix: str, component: str, environ: Mapping[str, str] | None = None) -> S:
    """``cls`` from the ``<prefix><FIELD>`` variables of ``environ`` (``os.environ`` by default),
    each read by its field's type, every value checked against its field's bounds.

    ``component`` names the component in the refusal of an unknown variable ("the agent").
    Raises ValueError naming the variable and what it may be.
    """
    env = os.environ if environ is None else environ
    known = {f"{prefix}{f.name.upper()}": f for f in dataclasses.fields(cls)}
    unknown = sorted(name for name in env
                     if name.startswith(prefix) and name not in known and not SERVICE_LINK.fullmatch(name))
    if unknown:
        where = f"{cls.__module__}.{cls.__qualname__}"
        raise ValueError("\n".join(_unknown(name, prefix, known, component, where) for name in unknown))
    hints = typing.get_type_hints(cls)
    values = {f.name: parse(name, env[name], hints[f.name]) for name, f in known.items() if name in env}
    settings = cls(**values)
    for name, f in known.items():
        bounds = f.metadata.get("bounds")
        if bounds is not None:
            check(name, getattr(settings, f.name), bounds)
    return settings


def parse(name: str, raw: str, kind: Any) -> object:
    """The value of variable ``name`` for a field of type ``kind``."""
    if kind is bool:
        if raw.lower() not in TRUE + FALSE:
            raise ValueError(f"{name}={raw!r} is not a valid bool: {_alternatives(TRUE + FALSE)}")
        return raw.lower() in TRUE
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if kind in (str, Path):
        return kind(raw)
    if typing.get_origin(kind) is tuple and typing.get_args(kind) == (str, ...):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if typing.get_origin(kind) is Literal:
        if raw not in typing.get_args(kind):
            raise ValueError(f"{name}={raw!r}: {_alternatives(typing.get_args(kind))}")
        return raw
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: {_alternatives([m.value for m in kind])}") from None
    raise TypeError(f"{name}: a setting of type {kind!r} cannot be read from the environment")


def check(name: str, value: Any, bounds: Bounds) -> None:
    """Raise ValueError when ``value`` of variable ``name`` is outside ``bounds`` (NaN is outside any)."""
    low, high = bounds.at_least, bounds.at_most
    if bounds.required and not value:
        wrong = " is required"
    elif low is not None and high is not None and not low <= value <= high:
        wrong = f"={value!r}: {low} to {high}"
    elif low is not None and not value >= low:
        wrong = f"={value!r}: at least {low}"
    elif high is not None and not value <= high:
        wrong = f"={value!r}: at most {high}"
    elif bounds.above is not None and not value > bounds.above:
        wrong = f"={value!r}: above {bounds.above}"
    else:
        return
    raise ValueError(f"{name}{wrong}" + (f" ({bounds.why})" if bounds.why else ""))


def _unknown(name: str, prefix: str, known: Mapping[str, object], component: str, where: str) -> str:
    # Matched without the prefix, which every name shares and would make any two look alike.
    near = difflib.get_close_matches(name[len(prefix):], [k[len(prefix):] for k in known], n=1)
    hint = f"did you mean {prefix}{near[0]}?" if near else f"the settings are the fields of {where}"
    return f"{name} is not a setting of {component}; {hint}"


def _alternatives(choices: typing.Sequence[object]) -> str:
    words = [str(c) for c in choices]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
