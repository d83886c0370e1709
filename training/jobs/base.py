"""What a training job declares; the trainer, reports, sweeps, packaging, deploys and the HTTP client
read the declaration and nothing else about the job.

A job is a config (the options every job shares, in RunConfig, plus its own) and a Job subclass: how
to build its data and model, how to train and evaluate one epoch, and declarations: its metrics
(which picks the best epoch, what a sweep optimizes, how a report shows them), its report, and what
serving needs (handler, model code, request format, the example request a deploy checks). Jobs are
plug-ins found through the `dlops.jobs` entry-point group (training/jobs/__init__.py), the built-in
ones too: a package outside this one adds a model kind to every command once installed
(docs/jobs.md walks through one).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import click
import torch
from torch import nn

import serving
import training.hardware
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
        object.__setattr__(self, "data", None if self.data is None else str(self.data))
        object.__setattr__(self, "tags", parse_tags(None, None, self.tags or {}))
        check_fields(self)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Metric:
    """A metric a job logs: its name in MLflow, how people read it, which way is better."""

    name: str  # as logged: "val/acc1"
    label: str  # as shown: "val Acc@1 (%)"
    higher_is_better: bool
    log_scale: bool = False  # plotted on a log axis when it spans orders of magnitude (a perplexity)

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    @property
    def direction(self) -> str:
        return "maximize" if self.higher_is_better else "minimize"


VAL_LOSS = Metric(name="val/loss", label="val loss", higher_is_better=False)  # what early stopping watches


@dataclass(frozen=True, kw_only=True)
class Column:
    """A column of a report's run table: one number per run, from a metric's history."""

    label: str
    metric: str
    summary: str = "last"  # last (the run's latest value), max, min or mean over its epochs
    digits: int = 2
    unit: str = ""


@dataclass(frozen=True, kw_only=True)
class EpochTable:
    """A report table of one metric per epoch, a column per run, and a final row (e.g. test ppl),
    followed by each run's newest file under `samples` (an artifact folder) when it has one."""

    title: str
    metric: Metric
    final: Column | None = None
    samples: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    """How `dlops report` shows the job's runs."""

    columns: tuple[Column, ...]  # the run table's quality columns
    throughput: Column
    train_loss: str  # the training loss curve (dashed) beside val loss
    quality: Metric  # the second learning-curve panel
    epoch_table: EpochTable | None = None


@dataclass(frozen=True, kw_only=True)
class Request:
    """One HTTP request to a served model."""

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


# The code every served model ships beside its handler (serving/handlers/): loading, batching, errors
COMMON_HANDLER_FILES = ("handler_common.py", "request_fields.py")
HANDLERS = Path(serving.__file__).resolve().parent / "handlers"


@dataclass(frozen=True, kw_only=True)
class ServingSpec:
    """What packaging, deploys, MLflow models and the HTTP client need of a job that serves."""

    name: str  # the TorchServe model name: /predictions/<name>
    handler: Path  # the handler module (a BaseHandler of serving/handlers/handler_common.py)
    handler_class: str  # its class: TorchServe's entry point and the MLflow pyfunc model's
    model_file: Path  # the module that builds the model, shipped as dlops_<its name>
    inference_keys: tuple[str, ...] = ()  # checkpoint entries inference needs beside weights and model_config
    input: str = "file"  # what `dlops predict INPUT` takes: "file" (a path) or "text" (the input itself)

    def files(self) -> dict[Path, str]:
        """The code a .mar or an MLflow model of this job ships: source file -> name inside it. None of
        it imports this project (a served model needs torch, and what the job's own code imports)."""
        return {
            self.handler: self.handler.name,
            **{HANDLERS / name: name for name in COMMON_HANDLER_FILES},
            Path(training.hardware.__file__).resolve(): "dlops_hardware.py",
            self.model_file: f"dlops_{self.model_file.name}",
        }


@dataclass(kw_only=True)
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scheduler_per_batch: bool = False  # one-cycle steps every batch, the others every epoch


@dataclass(frozen=True, kw_only=True)
class EpochContext:
    """What a job's train_epoch gets from the trainer."""

    epoch: int
    optimization: Optimization
    scaler: torch.amp.GradScaler
    log_step: Callable[[dict[str, float], int], None]  # metrics at a global step (skipped if already logged)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None  # sum over DDP processes, or None
    control: StepControl | None = None  # pass to the loop: checkpoints within the epoch, stop requests
    resume: dict[str, Any] | None = None  # the loop's state where a stopped epoch left off (its "step")


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    """`dlops evaluate`'s options; a job uses those that apply to it."""

    split: str = "val"
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    amp: str = "off"
    limit: int | None = None
    print_freq: int = 10


SERVING_METHODS = ("example_request", "offline_answer", "http_request")


class Job(abc.ABC):
    """The declaration the trainer runs. Subclasses set the class attributes and implement the
    abstract methods (a job missing one fails when its class is instantiated, not mid-run); the
    other methods are hooks with defaults."""

    kind: ClassVar[str]  # `dlops train KIND`; the entry point's name
    data_hint: ClassVar[str]  # what DATA is, for the error when it is missing
    config_class: ClassVar[type[RunConfig]]
    metrics: ClassVar[tuple[Metric, ...]]  # what it logs per epoch that a user may pick (sweeps, reports)
    best: ClassVar[Metric]  # picks the best epoch (best.pt, the registered version, promote --if-better)
    sweep: ClassVar[Metric | None] = None  # what a sweep optimizes, reported every epoch (default: best)
    early_stop: ClassVar[Metric] = VAL_LOSS  # what --early-stop-patience watches (evaluate must return it)
    panels: ClassVar[dict[str, list[str]]]  # the run's learning-curve picture: panel title -> metrics
    report: ClassVar[ReportSpec]
    serving: ClassVar[ServingSpec | None] = None
    summary_graph: ClassVar[bool] = False  # also trace the model into TensorBoard
    step_metrics: ClassVar[tuple[str, ...]] = ()  # metrics logged per global step inside an epoch
    # trains in several processes: its config has nproc_per_node and allow_oversubscribe (DDP via torchrun)
    distributed: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A job that serves defines what a deploy checks and how a request is sent."""
        super().__init_subclass__(**kwargs)
        if getattr(cls, "metrics", None) is not None:  # a concrete job: what it names, it declares
            declared = {m.name for m in cls.metrics} | {cls.early_stop.name}
            named = [m.name for m in (cls.best, cls.sweep_metric(), cls.report.quality)]
            if cls.report.epoch_table:
                named.append(cls.report.epoch_table.metric.name)
            if set(named) - declared:
                raise TypeError(f"{cls.__name__} names metrics it does not declare: {sorted(set(named) - declared)}")
        if getattr(cls, "serving", None) is not None:
            missing = [name for name in SERVING_METHODS if getattr(cls, name) is getattr(Job, name)]
            if missing:
                raise TypeError(f"{cls.__name__} serves through {cls.serving.handler_class} but does not define "
                                f"{', '.join(missing)}")  # fmt: skip

    def __init__(self, config: RunConfig, runtime: Runtime):
        """`self.config` is the run's config from here on: a job may derive it (dataclasses.replace) as it
        resolves values (the dataset's augmentation...); the trainer logs and checkpoints this one."""
        self.config, self.runtime = config, runtime

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # --- options -------------------------------------------------------------------------------------
    @classmethod
    def data_required(cls, given: dict[str, Any]) -> bool:
        """Whether DATA must be given, from the options `given` (a job may generate its own, --dummy)."""
        return True

    @classmethod
    def resolve_options(cls, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """A new run's options: the defaults, any preset the options select, then what the user gave."""
        return {**defaults, **given}

    @classmethod
    def commands(cls) -> list[click.Command]:
        """CLI commands of this job's own beside `dlops train KIND` (an LM's `generate`...)."""
        return []

    @classmethod
    def upgrade_v1(cls, state: dict[str, Any]) -> tuple[dict, float, dict, dict]:
        """A version-1 checkpoint's (model_config, best value, job_state, extra entries)."""
        raise NotImplementedError(f"no {cls.kind} checkpoint of format version 1 exists")

    # --- data and model ------------------------------------------------------------------------------
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

    @staticmethod
    def describe_model(params: dict[str, str]) -> str:
        """The model in a few words, from a run's params (a report groups layer tables by it)."""
        return ""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Last touches before training (memory format...)."""
        return model

    @abc.abstractmethod
    def inference_meta(self) -> dict[str, Any]:
        """The checkpoint entries named by `serving.inference_keys` (class names, vocabulary...)."""
        raise NotImplementedError

    # --- serving: required of a job that serves (checked when its class is defined) -------------------
    @staticmethod
    def example_request(meta: dict[str, Any]) -> dict[str, Any]:
        """One request to the served model as named fields, built from the checkpoint's inference
        entries (`meta`), no data needed: what a deploy checks, an MLflow model's input example."""
        raise NotImplementedError

    @staticmethod
    def offline_answer(state: dict[str, Any], request: dict[str, Any], amp: str = "off") -> Any:
        """The answer to `request` computed here from checkpoint `state`, as the job's own commands
        compute it (not through the handler)."""
        raise NotImplementedError

    @staticmethod
    def answer_mismatch(served: Any, offline: Any, amp: str = "off") -> str | None:
        """Why a served answer differs from the offline one, or None when they agree."""
        return None if served == offline else f"served {served!r}, expected {offline!r}"

    @staticmethod
    def http_request(given: str, fields: dict[str, Any]) -> Request:
        """The request `dlops predict` sends for INPUT `given` (a path or text, as serving.input says)
        and the options the user added (`--topk`, `--field KEY=VALUE`)."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------------
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
        """Validation metrics of one epoch, `early_stop.name` among them."""
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
    def sweep_metric(cls) -> Metric:
        return cls.sweep or cls.best

    def registry_tags(self, best_value: float, best_epoch: int, final: dict[str, float]) -> dict[str, str]:
        return {self.best.name.replace("/", "_"): f"{best_value:.3f}", "epoch": str(best_epoch)}

    # what survives a resume besides the model, optimizer and RNG
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - a hook, empty by default
        pass

    # --- after training ------------------------------------------------------------------------------
    @classmethod
    def evaluate_checkpoint(cls, state: dict[str, Any], source: str, data: Path, options: EvaluateOptions) -> None:
        """`dlops evaluate`: the checkpoint `state` (named `source`) on DATA, logged as an MLflow run."""
        raise NotImplementedError(f"the {cls.kind} job has no `dlops evaluate`")
