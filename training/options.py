"""Options declared once: a config field carries its default, type, range, help and flags.

    @dataclass
    class ResNetConfig(RunConfig):
        lr: float = option(0.1, "--lr", type=click.FloatRange(0, min_open=True), help="peak learning rate")

`click_options(ResNetConfig)` turns the fields into the command's Click options, and every
construction of a config (the CLI, the torchrun entry point, a sweep, a test) converts and checks
each value through the same Click type in `__post_init__`, so a bad value fails the same way,
naming the option, whichever way it came in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click


@dataclasses.dataclass(kw_only=True, frozen=True)
class CliSpec:
    flags: tuple[str, ...]
    kwargs: dict[str, Any]
    resumable: bool  # may change when resuming a run without making its logged params untrue


def option(
    default: Any,
    *flags: str,
    type: Any = None,  # noqa: A002 - Click's own name for it
    help: str | None = None,  # noqa: A002
    resumable: bool = False,
    factory: Callable[[], Any] | None = None,
    **click_kwargs: Any,
) -> Any:
    """A dataclass field that is also a command-line option (`flags` default to --field-name)."""
    kwargs = {"type": type, "help": help, **click_kwargs}
    metadata = {
        "cli": CliSpec(
            flags=tuple(flags), kwargs={k: v for k, v in kwargs.items() if v is not None}, resumable=resumable
        )
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def internal(default: Any = None) -> Any:
    """A config field that is resolved by the program (logged as a param), not typed by the user."""
    return dataclasses.field(default=default, metadata={"internal": True})


def cli_fields(config_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if "cli" in f.metadata]


def flag_names(f: dataclasses.Field) -> list[str]:
    spec: CliSpec = f.metadata["cli"]
    flags = list(spec.flags) or [f"--{f.name.replace('_', '-')}"]
    if f.type in (bool, "bool") and not spec.kwargs.get("is_flag") and "/" not in flags[-1]:
        flags[-1] = f"{flags[-1]}/--no-{flags[-1].removeprefix('--')}"
    return flags


def display_flag(f: dataclasses.Field) -> str:
    """The long flag a user types for this field, for error messages."""
    return next((x for x in flag_names(f) if x.startswith("--")), flag_names(f)[0]).split("/")[0]


def resumable_fields(config_class: type) -> set[str]:
    return {f.name for f in cli_fields(config_class) if f.metadata["cli"].resumable}


def click_options(config_class: type) -> Callable:
    """Decorator adding one Click option per declared field of `config_class`, in field order."""

    def decorate(command: Callable) -> Callable:
        for f in reversed(cli_fields(config_class)):
            spec: CliSpec = f.metadata["cli"]
            default = f.default if f.default is not dataclasses.MISSING else None
            kwargs = {"default": default, "show_default": default is not None, **spec.kwargs}
            if spec.kwargs.get("multiple"):
                del kwargs["default"], kwargs["show_default"]
            command = click.option(*flag_names(f), f.name, **kwargs)(command)
        return command

    return decorate


def check_fields(config: Any) -> None:
    """Convert and range-check every declared field through its Click type, as the config is built
    (its __post_init__: frozen from then on)."""
    for f in cli_fields(type(config)):
        value = getattr(config, f.name)
        param_type = f.metadata["cli"].kwargs.get("type")
        if value is None or param_type is None or f.metadata["cli"].kwargs.get("multiple"):
            continue
        param_type = click.types.convert_type(param_type)
        try:
            object.__setattr__(config, f.name, param_type.convert(value, None, None))
        except click.BadParameter as e:
            raise ValueError(f"{display_flag(f)} {value!r}: {e.message}") from e
