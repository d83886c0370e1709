"""What a training job declares; the trainer (training/trainer.py) does everything else.

A job is a config (options every job shares, in RunConfig, plus its own) and a Job subclass that
says how to build its data and model, how to train and evaluate one epoch, which metric picks the
best epoch, what its learning-curve panels show, and what serving needs. To add a third model,
write one file in training/jobs/ and list it in training/jobs/__init__.py.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click
import torch
from torch import nn

from training.hardware import AMP_CHOICES
from training.loops.control import StepControl
from training.options import check_fields, internal, option
from training.runtime import Runtime


def parse_tags(ctx: click.Context | None, param: click.Parameter | None, values: Any) -> dict[str, str]:
    """--tag KEY=VALUE (repeatable) -> {KEY: VALUE}."""
    if isinstance(values, dict):
        return values
    pairs = [v.partition("=") for v in values]
    bad = [v for v, (_, sep, _) in zip(values, pairs, strict=True) if not sep]
    if bad:
        raise click.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}")
    return {key: value for key, _, value in pairs}


@dataclass
class RunConfig:
    """Options every training job has. A job's config subclasses this and may change defaults."""

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
        False, is_flag=True, envvar="DLOPS_OFFLINE", resumable=True,
        help="track into the run's journal only; `dlops sync RUN_DIR` delivers it to MLflow later",
    )  # fmt: skip
    sync_timeout: float = option(
        60.0, type=click.FloatRange(0), envvar="DLOPS_SYNC_TIMEOUT", resumable=True,
        help="seconds to wait at the end for the tracking server to take the run's records",
    )  # fmt: skip
    tags: dict[str, str] = option(
        None, "--tag", factory=dict, multiple=True, callback=parse_tags, metavar="KEY=VALUE", resumable=True,
        help="extra MLflow run tag (repeatable)",
    )  # fmt: skip
    amp_requested: str | None = internal()  # what --amp said before it was resolved for the device

    def __post_init__(self) -> None:
        # checkpoints store the config and load with weights_only=True: plain strings, never Paths
        self.data = None if self.data is None else str(self.data)
        self.tags = parse_tags(None, None, self.tags or {})
        check_fields(self)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REPO = Path(__file__).resolve().parents[2]
HANDLERS = REPO / "serving" / "handlers"  # code that ships inside .mar archives and MLflow models


@dataclass(frozen=True)
class ServingSpec:
    """What packaging needs: the TorchServe model name, the handler (file and class), the model file
    it imports and the checkpoint entries inference needs beside the weights and model_config."""

    name: str  # /predictions/<name>
    handler: str  # serving/handlers/<handler>
    model_file: str  # training/models/<model_file>, shipped as dlops_<model_file>
    inference_keys: tuple[str, ...] = ()
    handler_class: str | None = None  # the handler's class: also the MLflow model's (None: no MLflow model)

    def files(self) -> dict[Path, str]:
        """The code a .mar or an MLflow model of this job ships: source file -> name inside it.
        None of it imports this project (a served model needs torch, torchvision and Pillow only)."""
        return {
            HANDLERS / self.handler: self.handler,
            HANDLERS / "handler_common.py": "handler_common.py",
            HANDLERS / "request_fields.py": "request_fields.py",
            REPO / "training" / "hardware.py": "dlops_hardware.py",
            REPO / "training" / "models" / self.model_file: f"dlops_{self.model_file}",
        }


@dataclass(frozen=True)
class Criterion:
    """A validation metric and which way is better: picks the best epoch, or what a sweep optimizes."""

    metric: str
    higher_is_better: bool

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    @property
    def direction(self) -> str:
        return "maximize" if self.higher_is_better else "minimize"


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scheduler_per_batch: bool = False  # one-cycle steps every batch, the others every epoch


@dataclass
class EpochContext:
    """What a job's train_epoch gets from the trainer."""

    epoch: int
    optimization: Optimization
    scaler: torch.amp.GradScaler
    log_step: Callable[[dict[str, float], int], None]  # metrics at a global step (skipped if already logged)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None  # sum over DDP processes, or None
    control: StepControl | None = None  # pass to the loop: checkpoints within the epoch, stop requests
    resume: dict[str, Any] | None = None  # the loop's state where a stopped epoch left off (its "step")


SERVING_METHODS = ("example_request", "offline_answer")


class Job(abc.ABC):
    """The declaration the trainer runs. Subclasses set the class attributes and implement the
    abstract methods (a job missing one fails when its class is instantiated, not mid-run); the
    other methods are hooks with defaults."""

    kind: ClassVar[str]
    data_hint: ClassVar[str]  # what DATA is, for the error when it is missing
    config_class: ClassVar[type[RunConfig]]
    best: ClassVar[Criterion]  # picks the best epoch (best.pt, the registered version)
    sweep: ClassVar[Criterion | None] = None  # what a sweep optimizes, reported every epoch (default: best)
    panels: ClassVar[dict[str, list[str]]]  # learning-curve picture: panel title -> metrics
    serving: ClassVar[ServingSpec]
    summary_graph: ClassVar[bool] = False  # also trace the model into TensorBoard
    step_metrics: ClassVar[tuple[str, ...]] = ()  # metrics logged per global step inside an epoch
    # trains in several processes: its config has nproc_per_node and allow_oversubscribe (DDP via torchrun)
    distributed: ClassVar[bool] = False

    @classmethod
    def data_required(cls, given: dict[str, Any]) -> bool:
        """Whether DATA must be given, from the options `given` (a job may generate its own, --dummy)."""
        return True

    @classmethod
    def resolve_options(cls, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """A new run's options: the defaults, any preset the options select, then what the user gave."""
        return {**defaults, **given}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A job that serves (its ServingSpec names a handler class) defines what a deploy checks."""
        super().__init_subclass__(**kwargs)
        serving = getattr(cls, "serving", None)
        if serving is not None and serving.handler_class:
            missing = [name for name in SERVING_METHODS if getattr(cls, name) is getattr(Job, name)]
            if missing:
                raise TypeError(f"{cls.__name__} serves through {serving.handler_class} but does not define "
                                f"{', '.join(missing)}")  # fmt: skip

    def __init__(self, config: RunConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # data and model
    @abc.abstractmethod
    def build_data(self) -> dict[str, Any]:
        """Load the data; return run tags describing it (dataset path, sizes...)."""
        raise NotImplementedError

    @abc.abstractmethod
    def model_config(self) -> dict[str, Any]:
        """Everything build_model needs; stored in every checkpoint."""
        raise NotImplementedError

    @staticmethod
    @abc.abstractmethod
    def build_model(model_config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Last touches before training (memory format...)."""
        return model

    @abc.abstractmethod
    def inference_meta(self) -> dict[str, Any]:
        """The checkpoint entries named by `serving.inference_keys` (class names, vocabulary...)."""
        raise NotImplementedError

    # what a deploy checks, and an MLflow model's input example: required of a job that serves
    # (checked when its class is defined, __init_subclass__)
    @staticmethod
    def example_request(meta: dict[str, Any]) -> dict[str, Any]:
        """One request to the served model as named fields, built from the checkpoint's inference
        entries (`meta`), no data needed."""
        raise NotImplementedError

    @staticmethod
    def offline_answer(state: dict[str, Any], request: dict[str, Any], amp: str = "off") -> Any:
        """The answer to `request` computed here from checkpoint `state`, as `dlops evaluate` or
        `dlops generate` compute it (not through the handler)."""
        raise NotImplementedError

    @staticmethod
    def answer_mismatch(served: Any, offline: Any, amp: str = "off") -> str | None:
        """Why a served answer differs from the offline one, or None when they agree."""
        return None if served == offline else f"served {served!r}, expected {offline!r}"

    def pretrain(self, model: nn.Module) -> dict[str, Any]:
        """Start a fresh `model` from published weights where the config asks (--pretrained); return
        run params saying what was done."""
        return {}

    def check_warm_start(self, source: dict[str, Any]) -> None:  # noqa: B027 - a hook, empty by default
        """Refuse --init-from a checkpoint whose weights mean something else (raise ValueError)."""

    @abc.abstractmethod
    def example_input(self) -> torch.Tensor:
        """One input as the model sees it, for the layer table."""
        raise NotImplementedError

    # optimization and epochs
    @abc.abstractmethod
    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        return 1

    def before_epoch(self, epoch: int, optimization: Optimization) -> None:  # noqa: B027 - a hook, empty by default
        """Per-epoch set-up (the learning rate...)."""

    @abc.abstractmethod
    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        raise NotImplementedError

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, reduce: Callable | None) -> dict[str, float]:
        raise NotImplementedError

    def after_epoch(self, *, improved: bool) -> None:  # noqa: B027 - a hook, empty by default
        """Per-epoch bookkeeping after validation (e.g. anneal the learning rate)."""

    @abc.abstractmethod
    def epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        raise NotImplementedError

    def finish(self, model: nn.Module, best: Path) -> dict[str, float]:
        """After the last epoch (e.g. the test split with the best weights); return final metrics."""
        return {}

    def run_params(self) -> dict[str, Any]:
        """Params beyond the config (resolved values such as the per-process batch size)."""
        return {}

    @classmethod
    def sweep_criterion(cls) -> Criterion:
        return cls.sweep or cls.best

    def registry_tags(self, best_value: float, best_epoch: int, final: dict[str, float]) -> dict[str, str]:
        return {self.best.metric.replace("/", "_"): f"{best_value:.3f}", "epoch": str(best_epoch)}

    # what survives a resume besides the model, optimizer and RNG
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - a hook, empty by default
        pass
