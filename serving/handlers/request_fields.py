"""Request fields declared once: name, type, range, default and help.

The text-generation handler validates every request against GENERATION_FIELDS; `dlops
generate-http` builds its options from it, and the README's request table is printed from it
(`python serving/handlers/request_fields.py`; a test checks the README matches). Standard library
only: it ships inside the .mar next to the handler.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIN_TEMPERATURE = 0.01  # below it logits / temperature overflow to inf and sampling to NaN (1e-300 did)


class BadRequest(Exception):
    """A request the handler refuses; `status` is the 4xx code answered to that request alone."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(kw_only=True, frozen=True)
class Field:
    name: str
    kind: type  # str, int or float
    default: Any  # a value, or a callable giving one per request (e.g. a random seed)
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    max_length: int | None = None  # for strings

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def check(self, value: Any) -> Any:
        """The value, converted and range-checked, or BadRequest naming the field."""
        if self.kind is str:
            if not isinstance(value, str):
                raise BadRequest(f"'{self.name}' must be a string, got {json.dumps(value)}")
            if self.max_length is not None and len(value) > self.max_length:
                raise BadRequest(f"'{self.name}' is longer than {self.max_length} characters")
            return value
        if self.kind is int:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"'{self.name}' must be an integer, got {json.dumps(value)}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'{self.name}' must be a number, got {json.dumps(value)}")
        if not math.isfinite(value):
            raise BadRequest(f"'{self.name}' must be a finite number, got {value}")
        if (self.low is not None and (value < self.low or (self.low_open and value == self.low))) or (
            self.high is not None and value > self.high
        ):
            raise BadRequest(f"'{self.name}' must be {self.range_text()}, got {value}")
        return self.kind(value)

    def range_text(self) -> str:
        if self.kind is int:
            return f"between {int(self.low)} and {int(self.high)}"
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        return f"{low} and <= {self.high:g}"


GENERATION_FIELDS = (
    Field(
        name="prompt",
        kind=str,
        default="",
        help="text to continue; words outside the vocabulary become `<unk>`",
        max_length=2000,
    ),
    Field(name="max_words", kind=int, default=50, help="words to generate", low=1, high=500),
    Field(
        name="temperature",
        kind=float,
        default=1.0,
        help="sampling temperature; higher is more diverse",
        low=MIN_TEMPERATURE,
        high=10.0,
    ),  # fmt: skip
    Field(
        name="seed",
        kind=int,
        default=lambda: random.randrange(2**31),
        help="the same seed gives the same text",
        low=0,
        high=2**63 - 1,
    ),
)


def non_finite_path(value: Any, path: str = "") -> str | None:
    """Where a NaN or an infinity sits in a decoded JSON value (Python's json accepts them), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "the body"
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for p, v in items if (found := non_finite_path(v, p))), None)


def validate(body: dict, fields: tuple[Field, ...]) -> dict[str, Any]:
    """Every field of `fields`, from `body` or its default; unknown or bad fields are BadRequest."""
    known = {f.name for f in fields}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; accepted: {sorted(known)}")
    bad = non_finite_path(body)
    if bad:
        raise BadRequest(f"'{bad}' is not a finite number (NaN and Infinity are refused)")
    return {f.name: f.check(body[f.name]) if f.name in body else f.default_value() for f in fields}


def markdown_table(fields: tuple[Field, ...]) -> str:
    def default(f: Field) -> str:
        return "random" if callable(f.default) else json.dumps(f.default)

    def allowed(f: Field) -> str:
        if f.kind is str:
            return f"up to {f.max_length} characters" if f.max_length else "any text"
        return f.range_text()

    lines = ["| field | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{f.name}` | {f.kind.__name__} | {allowed(f)} | {default(f)} | {f.help} |" for f in fields]
    return "\n".join(lines)


def click_options(fields: tuple[Field, ...]) -> Callable:
    """Click options for a client, one per field, with the server's own ranges (imports click lazily)."""
    import click

    def option(f: Field):
        flag = f"--{f.name.replace('_', '-')}"
        if f.kind is str:
            kind = click.STRING
        elif f.kind is int:
            kind = click.IntRange(int(f.low), int(f.high))
        else:
            kind = click.FloatRange(f.low, f.high, min_open=f.low_open)
        default = None if callable(f.default) else f.default
        return click.option(flag, f.name, type=kind, default=default, show_default=default is not None, help=f.help)

    def decorate(command: Callable) -> Callable:
        for f in reversed(fields):
            command = option(f)(command)
        return command

    return decorate


if __name__ == "__main__":
    print(markdown_table(GENERATION_FIELDS))
