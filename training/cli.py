"""`dlops`: Click commands only. Each parses options and calls one plain function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from release.deploy import DeployError
from serving import environment
from serving.gateway import GatewayError
from serving.keys import KeyFileError
from serving.secrets import private_dir
from serving.server import DEFAULT_TOKEN_EXPIRATION_MIN, ServeError
from training import tracking, trainer
from training.checkpoint import CheckpointError
from training.clitools import (
    CHECKPOINT,
    Duration,
    client_options,
    options,
    server_client,
    show_answer,
    state_dir_option,
    tls_options,
)
from training.data import LOADER_WORKERS
from training.data.errors import DatasetError
from training.devices import DeviceError
from training.distributed import Nodes, check_process_count, launch, node_id, resolve_nodes, under_torchrun
from training.evaluation import evaluate_checkpoint
from training.jobs import JobSpec, broken_jobs, job_for, job_serving, jobs, make_config
from training.jobs.evaluate import EvaluateOptions
from training.options import click_options
from training.stopping import STOPPED_BY_SIGNAL, TrainingStopped, exit_now
from training.tracking import JournalBusy, TrackingRefused, TrackingUnavailable
from training.tracking.registry import URI_FORMS
from training.tracking.server import ServerSetupError
from training.tracking.tags import SERVING_ALIAS

USER_ERRORS = (
    DatasetError, DeviceError, CheckpointError, ServeError, DeployError, KeyFileError, ValueError,
    TrackingUnavailable, TrackingRefused, JournalBusy, ServerSetupError, GatewayError,
)  # fmt: skip


STOPPED: list[TrainingStopped] = []  # a run this process stopped on a signal (run() exits fast then)


class Group(click.Group):
    """Turn expected failures (bad data, device, checkpoint, server) into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e
        except TrainingStopped as e:  # stopped by a signal, checkpoint written: 128 + the signal's number
            STOPPED.append(e)
            raise click.exceptions.Exit(e.exit_code) from e


def given_options(ctx: click.Context) -> dict[str, Any]:
    """Options the user gave, on the command line or through their environment variable (not defaults)."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k) in given}


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Train, evaluate and serve models of every installed job (a ResNet on Tiny-ImageNet, a word-level LM
    on WikiText-2, and any job a plug-in adds), tracked in MLflow."""
    # A console in a non-UTF-8 codec (e.g. gbk) must not crash a run over one printed word.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    for broken in broken_jobs():
        click.echo(f"warning: {broken.describe()}; the other jobs work", err=True)


@main.group(cls=Group)
def train() -> None:
    """Train a model; every run is logged to MLflow."""


def train_command(job: JobSpec, group: click.Group) -> None:
    """`dlops train KIND DATA [options]` in `group`: the options come from the job's config fields."""

    @group.command(job.kind, help=job.description)
    @click.argument("data", required=False, type=click.Path(file_okay=False, path_type=Path))
    @click_options(job.config)
    @click.option(
        "--resume",
        default=None,
        metavar="CKPT|auto",
        help="last.pt of an interrupted run: continue the same MLflow run where it stopped (within an epoch "
        "too); auto: the newest unfinished run of this --run-name in --out-dir, else a new run",
    )
    @click.pass_context
    def command(ctx: click.Context, data: Path | None, resume: str | None, **_: Any) -> None:
        given = {k: v for k, v in given_options(ctx).items() if k not in ("data", "resume")}
        if data:
            given["data"] = str(data)
        resume = _resume_path(job, resume, given)
        if not data and not resume and job.data_required(given):
            raise click.UsageError(f"give DATA: {job.data_hint}")
        config = make_config(job, given, resume)
        if job.distributed and not under_torchrun():
            nodes = _nodes(job, config)
            if nodes or config.nproc_per_node > 1:
                check_process_count(config.nproc_per_node, config.device, insist=config.allow_oversubscribe)
                code = launch(job.kind, config, config.nproc_per_node, resume, nodes)
                if nodes and code not in (0, *STOPPED_BY_SIGNAL):  # torchrun gave up: a node was lost for good
                    from training.session import end_lost_run

                    end_lost_run(Path(config.out_dir), job.kind, nodes.run_id)
                ctx.exit(code)
        trainer.train(job, config, resume=resume)


def _nodes(job: JobSpec, config: Any) -> Nodes | None:
    """The machines this run trains on (None: this one alone). A node without the data says so now, not
    after the others waited for it at the rendezvous."""
    try:
        nodes = resolve_nodes(config, job.kind)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if nodes and config.data and not Path(config.data).is_dir():
        raise click.ClickException(f"node {node_id()} has no DATA folder {config.data}: every node needs the data at "
                                   "the same path (a shared volume, or a copy on each). The other nodes wait for this "
                                   f"one at the rendezvous until --rdzv-timeout ({config.rdzv_timeout} s)")  # fmt: skip
    return nodes


def _resume_path(job: JobSpec, resume: str | None, given: dict[str, Any]) -> Path | None:
    """--resume CKPT as a path; --resume auto: the newest unfinished run of the same name, or None."""
    from training.session import find_resumable

    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise click.BadParameter(f"{resume!r}: no such checkpoint file (or give auto)", param_hint="--resume")
        return Path(resume)
    out_dir = Path(given.get("out_dir", "runs"))
    found = find_resumable(out_dir, job.kind, given.get("run_name"))
    name = f"run {given['run_name']!r}" if given.get("run_name") else "unnamed run"
    click.echo(f"=> --resume auto: continuing {found}" if found else f"=> --resume auto: no unfinished {name} "
               f"in {out_dir}; starting a new one")  # fmt: skip
    return found


def _broken_train_command(kind: str, reason: str) -> None:
    """`dlops train KIND` of a plug-in that failed to load: says why, instead of "no such command"."""

    @train.command(kind, help=f"(failed to load) {reason}", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise click.ClickException(reason)


@main.group(cls=Group)
def data() -> None:
    """Create, download and prepare datasets (each job adds its own: `dlops data --help`)."""


for _job in jobs().values():
    train_command(_job, train)
    for _command in _job.commands:
        main.add_command(_command)
    for _command in _job.data_commands:
        data.add_command(_command)
for _broken in broken_jobs():
    _broken_train_command(_broken.kind, _broken.describe())


@main.command("sync")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def sync_command(path: Path) -> None:
    """Deliver to MLflow what run folders' tracking journals still hold: a run folder, or every run
    under a folder (offline runs, runs that ended while the server was down, killed processes)."""
    from training.tracking.sync import sync_runs

    sync_runs(path)


@main.command("tracking-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; anything but loopback needs the admin's password given, and TLS")  # fmt: skip
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--backend-store-uri", envvar=environment.BACKEND_STORE_URI, default=None,
              help="runs and models [default: SQLite in mlruns/]; with a password in it, give it in "
              "$MLFLOW_BACKEND_STORE_URI (a command line is visible to every user of the machine)")  # fmt: skip
@click.option("--database-password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="the database password, for a --backend-store-uri given without one")  # fmt: skip
@click.option("--artifacts-destination", default=None, help="where uploads go [default: mlruns/artifacts]")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True)
@click.option("--admin-password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="a file holding the admin's password (a secret); default: $MLFLOW_AUTH_ADMIN_PASSWORD")  # fmt: skip
@click.option(
    "--auth-db-uri",
    default=None,
    help="where logins live [default: the store's PostgreSQL database, else a SQLite file in --state-dir]",
)
@click.option("--allowed-hosts", default="auto", show_default=True,
              help="Host headers answered besides loopback: auto (this machine's names and addresses when "
              "--host is not loopback), or a comma list where `machine` stands for them; "
              "$MLFLOW_ALLOWED_HOSTS adds more")  # fmt: skip
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("mlruns/auth"),
              show_default=True, help="the auth config, the logins and generated password on SQLite, the "
              "stack's TLS CA")  # fmt: skip
@tls_options
@click.option("--artifact-store", "artifact_stores", multiple=True, metavar="URL",
              help="a store model versions may also be registered from (s3://team-bucket/); "
              "default: $DLOPS_ARTIFACT_STORES")  # fmt: skip
def tracking_server_command(**options: Any) -> None:
    """Run the team's MLflow tracking server with logins (MLflow's basic-auth app) until stopped."""
    from training.tracking.server import TrackingServer, run_server
    from training.tracking.sources import artifact_stores
    from training.tracking.store import DEFAULT_STORE_DIR

    store = private_dir(DEFAULT_STORE_DIR.resolve())
    options["backend_store_uri"] = options["backend_store_uri"] or f"sqlite:///{store / 'mlflow.db'}"
    options["artifacts_destination"] = options["artifacts_destination"] or str(store / "artifacts")
    options["artifact_stores"] = tuple(artifact_stores(options["artifact_stores"]))
    sys.exit(run_server(TrackingServer(**options)))


@main.group(cls=Group)
def users() -> None:
    """Teammates' logins on the tracking server (run as its admin: MLFLOW_TRACKING_USERNAME/PASSWORD)."""


_role_option = click.option(
    "--role",
    type=click.Choice(["reader", "editor", "promoter"]),
    required=True,
    help="reader: read everything; editor: also train and register (never delete, move no alias of another's "
    "model); promoter: an editor who may also move any model's aliases (what serves)",
)


@users.command("add")
@click.argument("name")
@_role_option
@click.option("--password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="the new user's password [default: a random one, printed once]")  # fmt: skip
def users_add_command(name: str, role: str, password_file: Path | None) -> None:
    """Create login NAME on the tracking server (MLFLOW_TRACKING_URI) with the rights of --role."""
    from training.tracking.users import add_user

    password = password_file.read_text(encoding="utf-8").strip() if password_file else None
    user = add_user(name, role, password)
    click.echo(f"=> user {user.name!r} ({user.role}) on {tracking.tracking_uri()}")
    if user.generated:
        click.echo(f"password (shown once; hand it over privately): {user.password}")


@users.command("set-role")
@click.argument("name")
@_role_option
def users_set_role_command(name: str, role: str) -> None:
    """Change the rights of login NAME."""
    from training.tracking.users import set_role

    set_role(name, role)
    click.echo(f"=> {name!r} is now a {role}")


@main.command("evaluate")
@click.option("--checkpoint", required=True, type=CHECKPOINT, help="a checkpoint file or a model URI")
@click.argument("data", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--split", default="val", show_default=True, help="which split of DATA (the job says which it has)")
@click.option("-b", "--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(0), default=LOADER_WORKERS, show_default=True,
              help="data loading processes, where the job loads files")  # fmt: skip
@click.option("--device", default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("-p", "--print-freq", type=click.IntRange(0), default=10, show_default=True)
def evaluate_command(checkpoint: str, data: Path, **settings: Any) -> None:
    """Evaluate a checkpoint on DATA as its job evaluates (a classifier: Acc@1/Acc@5; an LM: perplexity);
    the result is an MLflow run under the training run."""
    from training.tracking import registry

    state, source = registry.load_source(checkpoint)
    evaluate_checkpoint(job_for(state["kind"]), state, source, data, EvaluateOptions(**settings))


@main.command("sweep", context_settings={"ignore_unknown_options": True})
@click.argument("kind", type=click.Choice(list(jobs())))
@click.argument("data", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--trials", type=click.IntRange(1), required=True, help="complete or pruned trials the study ends with")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=SPEC",
    help="a searched option: float:LOW:HIGH, log:LOW:HIGH, int:LOW:HIGH, intlog:LOW:HIGH, choice:A,B,...",
)
@click.option(
    "--space",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="a YAML or TOML file of NAME: SPEC",
)
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "halving", "none"]), default="median", show_default=True)
@click.option(
    "--direction",
    type=click.Choice(["maximize", "minimize"]),
    default=None,
    help="must agree with the job's sweep metric (an accuracy: maximize; a loss: minimize)",
)
@click.option("--processes", type=click.IntRange(1), default=1, show_default=True,
              help="trial processes on this machine")  # fmt: skip
@click.option("--jobs", "jobs_deprecated", type=click.IntRange(1), default=None, hidden=True,
              help="the old name of --processes")  # fmt: skip
@click.option(
    "--storage",
    envvar=environment.SWEEP_STORAGE,
    default=None,
    help="Optuna storage URL shared by every process and machine [default: sqlite:///mlruns/optuna.db]; one "
    "with a password goes in $DLOPS_SWEEP_STORAGE (a command line is visible to every user of the machine)",
)
@click.option("--study-name", default=None, help="default: derived from the command (the same command continues it)")
@click.option("--seed", type=int, default=0, show_default=True, help="sampler seed (worker i uses seed + i)")
@click.option(
    "--heartbeat",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="seconds between trial heartbeats; a trial silent for 3 of them is failed",
)
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def sweep_command(*, kind: str, data: Path, train_args: tuple[str, ...], params: tuple[str, ...], space: Path | None,
                  processes: int, jobs_deprecated: int | None, storage: str | None, heartbeat: int,
                  **settings: Any) -> None:  # fmt: skip
    """Search KIND's options on DATA with Optuna; options after `--` are fixed for every trial."""
    from training.sweep import DEFAULT_STORAGE, read_space, resolve_spec, run_sweep

    if jobs_deprecated is not None:  # "jobs" also names the job kinds: the old flag still works
        click.echo(f"Note: --jobs is deprecated; it is --processes now (using --processes {jobs_deprecated})", err=True)
        processes = jobs_deprecated
    job = job_for(kind)
    command = train.commands[kind]
    with command.make_context(kind, [str(data), *train_args]) as train_ctx:  # the train command's own parsing
        fixed = {k: v for k, v in given_options(train_ctx).items() if k != "resume"}
    fixed["data"] = str(data)
    spec = resolve_spec(kind, fixed, read_space(job, params, space), storage=storage or DEFAULT_STORAGE,
                        heartbeat_s=heartbeat, **settings)  # fmt: skip
    run_sweep(spec, processes=processes)


@main.command("report")
@click.argument("run_ids", nargs=-1)
@click.option("--experiment", multiple=True, help="the runs of this experiment (newest --max-runs); repeatable")
@click.option("--filter", "filter_string", default="", help="MLflow search filter, e.g. \"params.arch = 'resnet18'\"")
@click.option("--max-runs", type=click.IntRange(1), default=50, show_default=True)
@click.option("--sweep", default=None, help="the runs of a sweep (its study name, tag sweep_id)")
@click.option("--comparison", default=None, help="the runs of a device benchmark (tag comparison_id)")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports/latest"),
    show_default=True,
    help="folder for report.html, report.md and report_files/",
)
@click.option("--mlflow-url", default=None, help="link each run to this MLflow UI, e.g. http://127.0.0.1:5000")
@click.option("--title", default=None)
def report_command(run_ids: tuple[str, ...], out: Path, **selection: Any) -> None:
    """Write an HTML report (self-contained) and its Markdown twin about runs recorded in MLflow."""
    from training.report.build import build_report

    build_report(out, run_ids=run_ids, **selection)


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--probe-seconds",
    type=click.FloatRange(0),
    default=15.0,
    show_default=True,
    help="time budget of the training-step probe (0: skip it)",
)
def doctor_command(*, as_json: bool, probe_seconds: float) -> None:
    """What this machine offers (torch, CUDA, GPUs, CPU ISA, bf16), a speed probe, and the options to use."""
    from training.doctor import run_doctor

    run_doctor(as_json=as_json, probe_budget_s=probe_seconds)


_model_settings = options(
    click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="TorchServe workers"),
    click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="server-side batching"),
    click.option("--max-batch-delay", type=click.IntRange(0), default=20, show_default=True, help="milliseconds"),
    click.option("--response-timeout", type=click.IntRange(1), default=120, show_default=True, help="seconds"),
)


def _settings(options: dict[str, Any]):
    """The per-model settings a .mar carries (model-config.yaml), from the _model_settings options."""
    from release.package import ModelSettings

    return ModelSettings(workers=options.pop("workers"), batch_size=options.pop("batch_size"),
                         max_batch_delay_ms=options.pop("max_batch_delay"),
                         response_timeout_s=options.pop("response_timeout"))  # fmt: skip


@main.command("package")
@click.argument("kind", type=click.Choice(list(jobs())))
@click.option("--checkpoint", type=CHECKPOINT, default=None, help="a checkpoint file or a model URI")
@click.option("--model-uri", default=None, help=f"from the MLflow registry: {URI_FORMS}")
@click.option("--run-id", default=None, help="an MLflow run: its checkpoints/best.pt")
@click.option(
    "--model-store", type=click.Path(file_okay=False, path_type=Path), default=Path("model_store"), show_default=True
)
@click.option("--version", default=None, help="model version in TorchServe (default: registry version, else epoch)")
@_model_settings
def package_command(*, kind: str, checkpoint: str | None, model_uri: str | None, run_id: str | None, model_store: Path,
                    version: str | None, **settings: Any) -> None:  # fmt: skip
    """Build a TorchServe .mar of a KIND checkpoint into --model-store; log it to the source MLflow run."""
    import tempfile

    from release.package import build_mar, resolve_source

    with tempfile.TemporaryDirectory() as tmp:
        source = resolve_source(checkpoint, model_uri, run_id, Path(tmp))
        build_mar(kind, source, store=model_store, settings=_settings(settings), version=version)


_canary_policy_option = click.option(
    "--policy", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
    help="a canary policy (YAML: steps, interval_s, min_requests, max_wait_s, max_error_rate, max_p99_ratio); "
    "default: steps 5, 10, 25, 50 %, 30 s each, 50 requests, 1% errors, p99 at most 2x",
)  # fmt: skip


def _canary_policy(kind: str | None, path: Path | None) -> Any:
    """The canary policy for a version of `kind` (None: the file alone, to check it early)."""
    from release.canary import CanaryPolicy

    try:
        return CanaryPolicy.for_job(kind, path)
    except (ValueError, TypeError) as e:
        raise click.BadParameter(str(e), param_hint="--policy") from e


@main.command("serve")
@click.option("--model", "models", multiple=True, metavar="SOURCE",
              help="what to serve (repeatable): a model URI, a checkpoint or a .mar; packaged into --model-store. "
              "Default: what --state-dir served last, else the newest .mar of each model in the store")  # fmt: skip
@click.option(
    "--model-store", type=click.Path(file_okay=False, path_type=Path), default=Path("model_store"), show_default=True
)
@state_dir_option
@click.option("--inference-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--inference-address", default="127.0.0.1", show_default=True,
              help="publish the inference API (with its key) for other machines, e.g. 0.0.0.0 or this machine's "
              "address; the management API stays on 127.0.0.1 always")  # fmt: skip
@click.option("--metrics-address", default="127.0.0.1", show_default=True,
              help="publish the metrics API, for a Prometheus on another machine")  # fmt: skip
@click.option("--management-port", type=click.IntRange(1, 65535), default=8081, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8082, show_default=True)
@click.option("--grpc-inference-port", type=click.IntRange(1, 65535), default=7070, show_default=True)
@click.option("--grpc-management-port", type=click.IntRange(1, 65535), default=7071, show_default=True)
@click.option("--no-auth", is_flag=True, help="turn token authorization off (local experiments only)")
@click.option("--token-expiration-min", type=click.FloatRange(0, min_open=True), default=DEFAULT_TOKEN_EXPIRATION_MIN,
              show_default=True, help="key lifetime; the key keeper renews each key at half of it")  # fmt: skip
@click.option("--torch-threads", type=click.IntRange(1), default=1, show_default=True, help="torch threads per worker")
@click.option(
    "--amp",
    type=click.Choice(["auto", "off", "bf16"]),
    default="auto",
    show_default=True,
    help="the served models' precision where their handler allows it; auto: bf16 where the device has it natively",
)
@click.option(
    "--alias", default=SERVING_ALIAS, show_default=True, help="registry alias of the versions this server serves"
)
@click.option(
    "--log-sample",
    "prediction_sample",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="the share of requests the prediction log keeps (a summary of each, and its answer); 0: none",
)
@click.option(
    "--log-dir",
    "prediction_log",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="the prediction log's folder (default: <state dir>/predictions)",
)
@click.option(
    "--log-max-mb",
    "prediction_log_mb",
    type=click.FloatRange(0.01),
    default=64.0,
    show_default=True,
    help="one worker's log file rotates past this size; a worker keeps two files at most",
)
@tls_options
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="the CA clients trust the certificate by (recorded for this machine's clients)")  # fmt: skip
@_model_settings
@click.option("--servers", type=click.IntRange(1), default=None,
              help="a fleet: this many TorchServe servers behind the gateway (HAProxy), which answers on "
              "--inference-port and splits canaries (docs/serving.md)")  # fmt: skip
@click.option("--follow", "follow_alias", default=None, metavar="ALIAS",
              help="(a fleet) stay in the foreground and roll out, through a canary, each version the registry "
              "alias moves to")  # fmt: skip
@_canary_policy_option
def serve_command(*, models: tuple[str, ...], no_auth: bool, alias: str, tls: str, servers: int | None,
                  follow_alias: str | None, policy: Path | None, **options: Any) -> None:  # fmt: skip
    """Start TorchServe (on 127.0.0.1 unless --inference-address publishes it, over TLS) and wait until every
    model is ready; it keeps its keys valid while it runs."""
    from release.deploy import serve
    from serving.server import ServeOptions
    from serving.tls import certificate_names, server_tls

    settings = _settings(options)
    published = {options["inference_address"], options["metrics_address"]} - {"127.0.0.1"}
    files = server_tls(tls, cert=options["tls_cert"], key=options["tls_key"], ca=options["tls_ca"],
                       directory=options["state_dir"] / "tls",
                       names=certificate_names(tuple(a for a in published if a not in ("0.0.0.0", "::"))))  # fmt: skip
    if files is not None:
        options.update(tls_cert=files.cert, tls_key=files.key, tls_ca=files.ca)
    if follow_alias and not servers:
        raise click.UsageError("--follow rolls versions out through canaries: it needs a fleet (--servers N)")
    _canary_policy(None, policy)  # a wrong policy file fails now, not at the first rollout
    serve(ServeOptions(auth=not no_auth, **options), list(models), settings, alias, servers=servers)
    if follow_alias:
        from release.controller import follow
        from serving.fleet import Fleet

        follow(Fleet.of(options["state_dir"]), follow_alias, policy, settings=settings, serving_alias=alias)


@main.group(cls=Group)
def tls() -> None:
    """Certificates for a stack whose servers leave loopback (MLflow, TorchServe)."""


@tls.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="a name or address clients use besides loopback and this machine's (repeatable): a compose "
              "service, a DNS alias")  # fmt: skip
@click.option("--machine/--no-machine", default=True, show_default=True,
              help="cover this machine's names and addresses too")  # fmt: skip
def tls_init_command(*, directory: Path, names: tuple[str, ...], machine: bool) -> None:
    """Make the stack's CA (once; kept in DIRECTORY) and a server certificate for every name clients use."""
    from serving.tls import certificate_names, stack_certificates

    covered = certificate_names(names, machine=machine)
    files = stack_certificates(directory, covered)
    click.echo(f"=> {files.cert} and {files.key} (owner-only) for {', '.join(covered)}")
    click.echo(f"=> the CA: {files.ca}. Hand it to teammates: MLFLOW_TRACKING_SERVER_CERT_PATH={files.ca} for "
               f"MLflow, `dlops predict --ca {files.ca}` (or REQUESTS_CA_BUNDLE) for TorchServe")  # fmt: skip


@main.command("stop")
@state_dir_option
def stop_command(state_dir: Path) -> None:
    """Stop the TorchServe (or the fleet and its gateway) started from --state-dir (no other)."""
    from serving.fleet import Fleet, stop_fleet
    from serving.server import stop

    fleet = Fleet.of(state_dir)
    click.echo(stop_fleet(fleet) if fleet else stop(state_dir))


_yield_option = click.option(
    "--yield-cpu/--no-yield-cpu", default=False, show_default=True,
    help="start the new version's workers at the lowest CPU priority until they pass the check (needs root or "
    "CAP_SYS_NICE to give the priority back; skipped otherwise, and said); no better than the default in "
    "bench/deploy_load.py on 2 cores (docs/benchmarks.md)",
)  # fmt: skip


@main.command("deploy")
@click.argument("source", metavar="MODEL_URI|CHECKPOINT|MAR")
@state_dir_option
@click.option("--model-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the server's model store (default: the one it was started with)")  # fmt: skip
@click.option(
    "--alias", default=SERVING_ALIAS, show_default=True, help="registry alias moved to the version now serving"
)
@click.option("--timeout", type=click.FloatRange(1), default=180.0, show_default=True, help="seconds per step")
@_yield_option
@click.option("--canary", is_flag=True, help="(a fleet) shift traffic to SOURCE step by step, judged on its own "
              "requests against the stable version's; abort on errors or latency (docs/serving.md)")  # fmt: skip
@_canary_policy_option
@_model_settings
def deploy_command(source: str, state_dir: Path, model_store: Path | None, alias: str, timeout: float, *,
                   yield_cpu: bool, canary: bool, policy: Path | None, **settings: Any) -> None:  # fmt: skip
    """Make SOURCE the version that answers on a running `dlops serve`, with no request dropped.

    Packages SOURCE, registers it beside the serving version, checks it answers the example request
    as its checkpoint does, switches to it, drains and retires the old version. On a fleet, every server
    does so, and --canary first sends it a growing share of the requests, judged at each step. Any
    failure leaves the old version serving and exits 1."""
    from release.canary import rollout
    from release.deploy import client_store, deploy, prepare
    from serving.client import ServerClient
    from serving.fleet import Fleet

    client = ServerClient.of(state_dir)
    store = model_store or Path(client_store(client))
    fleet = Fleet.of(state_dir)
    if (canary or policy) and fleet is None:
        raise click.UsageError(f"--canary needs a fleet: {state_dir} holds one server (`dlops serve --servers N`)")
    candidate = prepare(source, store, _settings(settings))
    if fleet is not None:
        chosen = _canary_policy(candidate.kind, policy) if canary or policy else None
        deployed = rollout(fleet, candidate, policy=chosen, alias=alias, timeout_s=timeout)
    else:
        deployed = deploy(client, candidate, alias, timeout, yield_cpu=yield_cpu)
    click.echo(f"=> serving {deployed.describe()}")


@main.command("rollback")
@click.argument("model", metavar="NAME")
@state_dir_option
@click.option("--alias", default=SERVING_ALIAS, show_default=True)
@click.option("--timeout", type=click.FloatRange(1), default=180.0, show_default=True, help="seconds per step")
@_yield_option
def rollback_command(model: str, state_dir: Path, alias: str, timeout: float, *, yield_cpu: bool) -> None:
    """Serve again the version of model NAME (its name in TorchServe: /predictions/NAME) that served before
    the current one."""
    from release.canary import rollout
    from release.deploy import rollback, rollback_candidate
    from serving.client import ServerClient
    from serving.fleet import Fleet

    client, fleet = ServerClient.of(state_dir), Fleet.of(state_dir)
    if fleet is not None:
        deployed = rollout(fleet, rollback_candidate(client, model), alias=alias, timeout_s=timeout, event="rollback")
    else:
        deployed = rollback(client, model, alias, timeout, yield_cpu=yield_cpu)
    click.echo(f"=> serving {deployed.describe()}")


@main.command("promote")
@click.argument("model_uri")
@click.option("--alias", default="champion", show_default=True)
@click.option("--if-better", is_flag=True, help="only when the version's validation metric beats the alias holder's")
def promote_command(*, model_uri: str, alias: str, if_better: bool) -> None:
    """Point a registry alias (models:/NAME@ALIAS) at the version MODEL_URI names."""
    from training.tracking import registry

    version = registry.resolve(model_uri)
    criterion = None
    if if_better:
        kind = registry.job_kind(version, tracking.store_client())
        if kind not in jobs():
            raise click.ClickException(f"{model_uri}: no training run of an installed job to compare by (job "
                                       f"{kind!r})")  # fmt: skip
        criterion = job_for(kind).best
    outcome = registry.promote(model_uri, alias, metric=criterion.name if criterion else None,
                               higher_is_better=criterion.higher_is_better if criterion else True)  # fmt: skip
    click.echo(f"=> {outcome.message}")


def _predicting_job(model: str | None, given: str):
    """The job whose request `dlops predict` builds: the one serving --model, else the one installed job
    whose served model takes a file, when INPUT is a file."""
    if model is not None:
        job = job_serving(model)
        if job is None:
            served = ", ".join(j.serving.name for j in jobs().values() if j.serving)
            raise click.UsageError(f"--model {model}: no installed job serves a model of that name ({served})")
        return job
    takes = "file" if Path(given).is_file() else "text"
    candidates = [j for j in jobs().values() if j.serving and j.serving.input == takes]
    if len(candidates) != 1:
        names = ", ".join(j.serving.name for j in candidates) or "none"
        raise click.UsageError(f"give --model NAME: INPUT is {'a file' if takes == 'file' else 'text'}, which the "
                               f"models of more than one job take, or none ({names})")  # fmt: skip
    return candidates[0]


def _fields(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--field KEY=VALUE: VALUE read as JSON when it parses (numbers, lists), else as text."""
    import json

    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--field")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


@main.command("predict")
@click.argument("given", metavar="INPUT")
@click.option("--model", default=None,
              help="the served model's name (/predictions/NAME); default: the one model that takes INPUT's kind "
              "(a file or text)")  # fmt: skip
@click.option("--field", "field_pairs", multiple=True, metavar="KEY=VALUE",
              help="another request field, as the model's job defines them (repeatable)")  # fmt: skip
@client_options
def predict_command(*, given: str, model: str | None, field_pairs: tuple[str, ...],
                    **server: Any) -> None:  # fmt: skip
    """Ask a served model about INPUT (an image file, a prompt, a table row: what the model's job says a
    request is) and print its answer (HTTP client)."""
    job = _predicting_job(model, given)
    if job.serving.input == "file" and not Path(given).is_file():
        raise click.BadParameter(f"{given!r}: no such file", param_hint="INPUT")
    fields = _fields(field_pairs)
    request = job.serving.request(given, fields)
    answer = server_client(**server).predict(model or job.serving.name, request.body, request.content_type,
                                             headers=request.headers)  # fmt: skip
    show_answer(answer)


@main.group(cls=Group)
def fleet() -> None:
    """A running fleet (`dlops serve --servers N`): servers behind the gateway."""


def _fleet(state_dir: Path) -> Any:
    from serving.fleet import Fleet

    found = Fleet.of(state_dir)
    if found is None:
        raise click.BadParameter(f"{state_dir} holds no fleet (`dlops serve --servers N`)", param_hint="--state-dir")
    return found


@fleet.command("add")
@state_dir_option
def fleet_add_command(state_dir: Path) -> None:
    """Start one more server with the versions the fleet serves; the gateway sends it requests once they are
    READY on it."""
    from serving.fleet import add_member

    found = _fleet(state_dir)
    add_member(found)


@fleet.command("follow")
@click.argument("alias")
@state_dir_option
@_canary_policy_option
@click.option("--interval", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="seconds between two looks at the registry")  # fmt: skip
def fleet_follow_command(alias: str, state_dir: Path, policy: Path | None, interval: float) -> None:
    """Roll out, through a canary, each version the registry alias ALIAS moves to, on the running fleet of
    --state-dir, until stopped (the controller of `dlops serve --follow`, for a fleet already up)."""
    from release.controller import follow

    found = _fleet(state_dir)
    _canary_policy(None, policy)
    follow(found, alias, policy, interval_s=interval)


@fleet.command("status")
@state_dir_option
@click.option("--window", type=click.FloatRange(1), default=60.0, show_default=True,
              help="seconds of requests to count, up to now")  # fmt: skip
def fleet_status_command(state_dir: Path, window: float) -> None:
    """The fleet's servers as the gateway sees them, each model's routes, and the requests of the last --window
    seconds per version (count, errors, p99) from the gateway's log."""
    import time

    from serving import gateway

    found = _fleet(state_dir)
    click.echo(gateway.runtime(found.gateway_dir, f"show servers state {gateway.STABLE}").strip())
    stable, canary = (gateway.read_map(found.gateway_dir, name) for name in ("stable", "canary"))
    weights = gateway.read_map(found.gateway_dir, "weights")
    for model, version in sorted(stable.items()):
        routes = {gateway.STABLE: version, gateway.CANARY: canary.get(model)}
        click.echo(f"{model}: stable {version}" + (f", canary {canary[model]} at {weights.get(model, '0')}%"
                                                   if model in canary else ""))  # fmt: skip
        for route, seen in gateway.traffic(found.gateway_dir, model, since=time.time() - window).items():
            click.echo(f"  {route} (version {routes.get(route)}): {seen.requests} requests, {seen.errors} errors, "
                       f"p99 {seen.p99_ms:.0f} ms in the last {window:g} s")  # fmt: skip


@main.group(cls=Group)
def keys() -> None:
    """The keys of a running `dlops serve` (its state dir): hand the inference key to teammates, rotate it."""


_api_option = click.option("--api", type=click.Choice(["inference", "management"]), default="inference",
                           show_default=True, help="the management key never leaves this machine's admins")  # fmt: skip


@keys.command("show")
@state_dir_option
@_api_option
def keys_show_command(state_dir: Path, api: str) -> None:
    """Print the current key of --api (the inference key is what a teammate's --key needs)."""
    from serving.keys import key_file, read_keys

    found = read_keys(state_dir)
    if api not in found:
        raise click.ClickException(f"no {api} key in {key_file(state_dir)}: no server with token authorization "
                                   "was started from this state dir")  # fmt: skip
    click.echo(found[api].value)
    expires = found[api].expires
    when = f"it expires at {expires:%Y-%m-%d %H:%M} UTC" if expires else "it does not expire"
    click.echo(
        f"({api} key of {state_dir}; {when}, and the key keeper replaces it at half its lifetime: "
        "hand over the new one then, or start the server with a longer --token-expiration-min)",
        err=True,
    )


@keys.command("rotate")
@state_dir_option
@_api_option
def keys_rotate_command(state_dir: Path, api: str) -> None:
    """Replace the key of --api now: the old one stops working at once (a leaked or departed teammate's key)."""
    from serving.client import ServerClient
    from serving.fleet import Fleet, new_key
    from serving.keys import renew

    fleet = Fleet.of(state_dir)
    if fleet is not None:
        if api != "inference":
            raise click.BadParameter("a fleet's servers have no keys of their own: only the gateway's inference "
                                     "key", param_hint="--api")  # fmt: skip
        click.echo(new_key(fleet))
    else:
        click.echo(renew(state_dir, ServerClient.of(state_dir).urls["management"], api).value)
    click.echo(f"(the new {api} key; the old one is refused from now on)", err=True)


# where `dlops monitor drift` and `dlops feedback` read the prediction log
log_dir_option = click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="the prediction log (default: where the server of --state-dir writes it)",
)


@main.group(cls=Group, invoke_without_command=True)
@state_dir_option
@click.option(
    "--prometheus",
    "url",
    default=None,
    metavar="URL",
    help="Prometheus's URL (default: the one `dlops monitor prometheus start` started for --state-dir)",
)
@click.option("--window", type=Duration(), default="1h", show_default=True, help="how far back: 90s, 30m, 1h, 2d")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("monitor-page"), show_default=True
)
@click.pass_context
def monitor(ctx: click.Context, state_dir: Path, url: str | None, window: float, out: Path) -> None:
    """Served versions watched (docs/monitoring.md). Without a subcommand: write OUT/monitor.html, each
    model's request rate, error rate and p50/p99 latency per version over the window, from Prometheus."""
    if ctx.invoked_subcommand is not None:
        return
    from monitoring import MonitorError, prometheus
    from monitoring.page import write_page

    url = url or prometheus.read_record(state_dir).get("url")
    if not url:
        raise click.UsageError(f"no Prometheus runs for {state_dir}: start one (dlops monitor prometheus start) "
                               "or name it with --prometheus URL")  # fmt: skip
    try:
        click.echo(f"=> wrote {write_page(out, url=url, window_s=window)}")
    except MonitorError as e:
        raise click.ClickException(str(e)) from e


@monitor.command("drift")
@click.argument("model_uri")
@click.option("--window", type=Duration(), default="1h", show_default=True, help="the logged requests of the last ...")
@state_dir_option
@log_dir_option
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("drift-report"),
    show_default=True,
    help="where Evidently's HTML report is written (and logged to MLflow)",
)
def monitor_drift_command(model_uri: str, window: float, state_dir: Path, log_dir: Path | None,
                          report_dir: Path) -> None:  # fmt: skip
    """Compare what MODEL_URI (models:/NAME/VERSION) was asked in the window with its validation data, with
    Evidently; log the check to MLflow and tag the version. Exit 1 on drift, 3 when the window holds too
    few logged requests to judge, 0 for no drift."""
    from monitoring import MonitorError
    from monitoring.drift import check_drift
    from monitoring.predictions import Window, log_folder
    from monitoring.runs import DRIFT, NOT_ENOUGH

    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        found, run_id = check_drift(model_uri, window=Window.last(window), log=log_folder(state_dir, log_dir),
                                    report_dir=report_dir)  # fmt: skip
    except MonitorError as e:
        raise click.ClickException(str(e)) from e
    share = f", {found.drift_share:.0%} of the columns drifted" if found.drift_share is not None else ""
    drifted = f" ({', '.join(found.drifted)})" if found.drifted else ""
    click.echo(f"=> {model_uri}: {found.verdict}{share}{drifted}; {found.requests} logged requests against "
               f"{found.reference} of the reference; MLflow run {run_id}")  # fmt: skip
    if found.verdict == DRIFT:
        sys.exit(1)
    if found.verdict == NOT_ENOUGH:
        sys.exit(3)


@monitor.group("prometheus", cls=Group)
def monitor_prometheus() -> None:
    """A Prometheus server (Debian's package) scraping the server or fleet of --state-dir."""


@monitor_prometheus.command("start")
@state_dir_option
@click.option("--port", type=click.IntRange(1, 65535), default=9090, show_default=True, help="on 127.0.0.1")
@click.option("--interval", type=click.FloatRange(0.1), default=15.0, show_default=True, help="seconds between scrapes")
def monitor_prometheus_start_command(state_dir: Path, port: int, interval: float) -> None:
    from monitoring import MonitorError, prometheus

    try:
        url = prometheus.start(state_dir, port=port, interval_s=interval)
    except MonitorError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"=> Prometheus scrapes {state_dir} every {interval:g} s: {url} (dlops monitor writes the page)")


@monitor_prometheus.command("stop")
@state_dir_option
def monitor_prometheus_stop_command(state_dir: Path) -> None:
    from monitoring import prometheus

    click.echo(prometheus.stop(state_dir))


@main.command("feedback")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", required=True, metavar="NAME", help="the registered model the answers came from")
@state_dir_option
@log_dir_option
def feedback_command(path: Path, model: str, state_dir: Path, log_dir: Path | None) -> None:
    """Join true answers (PATH: CSV with request_id,truth or JSON lines) to the logged answers of MODEL and
    log each version's live quality to MLflow, beside the figure it was registered with."""
    from monitoring import MonitorError
    from monitoring.feedback import live_quality
    from monitoring.predictions import log_folder

    try:
        results = live_quality(path, model=model, log=log_folder(state_dir, log_dir))
    except MonitorError as e:
        raise click.ClickException(str(e)) from e
    for r in results:
        registered = f" (registered with {r.registered:.3f})" if r.registered is not None else ""
        click.echo(f"=> {model}/{r.version}: live {r.name} {r.live:.3f} on {r.matched} answers{registered}; "
                   f"MLflow run {r.run_id}")  # fmt: skip


def run() -> None:
    """The `dlops` command. A run stopped by a signal has its state on disk (checkpoint, journal, the
    run ended KILLED) and a grace period to live: it exits at once rather than spend seconds in the
    interpreter's teardown."""
    try:
        main()
    except SystemExit as exiting:
        if STOPPED:
            exit_now(exiting.code if isinstance(exiting.code, int) else 1)
        raise


if __name__ == "__main__":
    run()
