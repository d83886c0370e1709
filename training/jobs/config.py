"""The options every training job has (RunConfig); a job's config subclasses it and adds its own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import click

from serving import environment
from training.hardware import AMP_CHOICES
from training.options import check_fields, internal, option


def parse_tags(ctx: click.Context | None, param: click.Parameter | None, values: Any) -> dict[str, str]:
    """--tag KEY=VALUE (repeatable) -> {KEY: VALUE}."""
    if isinstance(values, dict):
        return values
    pairs = [v.partition("=") for v in values]
    bad = [v for v, (_, sep, _) in zip(values, pairs, strict=True) if not sep]
    if bad:
        raise click.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}")
    return {key: value for key, _, value in pairs}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Options every training job has. A job's config subclasses this and may change defaults.

    Frozen once validated: a value resolved later (the precision for the device, an augmentation for
    the dataset) makes a new config with dataclasses.replace, never changes this one."""

    data: str | None = None  # the positional DATA argument
    epochs: int = option(20, type=click.IntRange(1), resumable=True)
    amp: str = option(
        "auto", type=click.Choice(AMP_CHOICES),
        help="mixed precision; auto: bf16 where the device has it natively, fp16 on older GPUs, else fp32",
    )  # fmt: skip
    compile: bool = option(False, help="torch.compile the model")
    seed: int = option(0, type=int)
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps", resumable=True)
    early_stop_patience: int = option(
        0, type=click.IntRange(0), resumable=True, help="stop when val loss has not improved for N epochs (0: never)"
    )
    init_from: str | None = option(
        None,
        metavar="CKPT|MODEL_URI",
        help="warm-start from one of our checkpoints or registered models "
        "(models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest)",
    )
    experiment: str = option("dlops")
    run_name: str | None = option(None)
    registered_model: str = option("dlops")
    out_dir: str = option("runs", resumable=True, help="checkpoints go to OUT_DIR/<run id>/")
    checkpoint_every: float = option(
        0.0, type=click.FloatRange(0), resumable=True, metavar="SECONDS",
        help="also write a resumable last.pt every SECONDS within an epoch (0: at the end of each epoch only)",
    )  # fmt: skip
    offline: bool = option(
        False, is_flag=True, envvar=environment.OFFLINE, resumable=True,
        help="track into the run's journal only; `dlops sync RUN_DIR` delivers it to MLflow later",
    )  # fmt: skip
    sync_timeout: float = option(
        60.0, type=click.FloatRange(0), envvar=environment.SYNC_TIMEOUT, resumable=True,
        help="seconds to wait at the end for the tracking server to take the run's records",
    )  # fmt: skip
    tags: dict[str, str] = option(
        None, "--tag", factory=dict, multiple=True, callback=parse_tags, metavar="KEY=VALUE", resumable=True,
        help="extra MLflow run tag (repeatable)",
    )  # fmt: skip
    amp_requested: str | None = internal()  # what --amp said before it was resolved for the device

    def __post_init__(self) -> None:
        # checkpoints store the config and load with weights_only=True: plain strings, never Paths
        object.__setattr__(self, "data", None if self.data is None else str(self.data))
        object.__setattr__(self, "tags", parse_tags(None, None, self.tags or {}))
        check_fields(self)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
