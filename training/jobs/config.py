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


class NodeCount(click.ParamType):
    """torchrun's --nnodes: N, or MIN:MAX (an elastic group that goes on with MIN after losing nodes)."""

    name = "N|MIN:MAX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        low, sep, high = str(value).partition(":")
        if not low.isdigit() or (sep and not high.isdigit()) or int(low) < 1 or (sep and int(high) < int(low)):
            self.fail(f"{value!r} is not a node count: N, or MIN:MAX with 1 <= MIN <= MAX", param, ctx)
        return str(value)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig(RunConfig):
    """The options of a job that trains with DDP through torchrun (JobSpec.distributed): processes on this
    machine, and the machines (nodes) training together (training/distributed.py)."""

    nproc_per_node: int = option(
        1, type=click.IntRange(1),
        help="processes on this machine (DDP through torchrun; one per GPU, or gloo on the CPU)",
    )  # fmt: skip
    allow_oversubscribe: bool = option(
        False, is_flag=True, help="start --nproc-per-node processes even beyond the CPU cores or GPUs"
    )
    nnodes: str = option(
        "1", type=NodeCount(), resumable=True,
        help="machines training together, each running this same command: N, or MIN:MAX to go on with fewer "
        "after one is lost [default: what Slurm's or SkyPilot's environment says, else 1]",
    )  # fmt: skip
    rdzv_endpoint: str | None = option(
        None, metavar="HOST[:PORT]", resumable=True,
        help="where the nodes meet (torchrun's c10d rendezvous, port 29500 unless given): a node every node "
        "reaches, which must stay up [default: the first node of the Slurm or SkyPilot job]",
    )  # fmt: skip
    rdzv_id: str | None = option(
        None, resumable=True,
        help="the job's id, the same on every node: restarted processes find their run by it [default: the "
        "Slurm job id or SkyPilot task id, else dlops-KIND]",
    )  # fmt: skip
    max_restarts: int = option(
        3, type=click.IntRange(0), resumable=True,
        help="times torchrun restarts the processes after one (or a node) is lost; each restart resumes the run "
        "from its last checkpoint",
    )  # fmt: skip
    rdzv_timeout: int = option(
        600, type=click.IntRange(1), resumable=True, metavar="SECONDS",
        help="how long the nodes wait for each other at a (re)start before giving up",
    )  # fmt: skip
