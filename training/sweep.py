"""Hyperparameter search: an Optuna study whose objective is the trainer, every trial an MLflow run.

    dlops sweep resnet DATA --trials 20 --param lr=log:1e-3:1 --param stem=choice:imagenet,small -- --epochs 10

- The search space: `--param NAME=SPEC` (or a YAML/TOML file, `--space`): NAME is any option of
  `train KIND`, SPEC is `float:LOW:HIGH`, `log:LOW:HIGH`, `int:LOW:HIGH`, `intlog:LOW:HIGH` or
  `choice:A,B,...`. Options after `--` are fixed for every trial. All of it is checked, against the
  option's own type and range, before any trial starts.
- Each trial is an ordinary training run (a child of the sweep's parent run, tagged sweep_id,
  trial and state) that reports its validation metric every epoch; the pruner may stop it there.
- The study lives in Optuna's RDB storage (default a SQLite file under mlruns/): `--processes K` runs
  K worker processes on it, other machines join with the same --storage (e.g. PostgreSQL), and
  running the same command again continues it. A trial whose process died is failed by Optuna's
  heartbeat check and its run marked FAILED; the study runs another in its place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import optuna
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from serving.secrets import child_environment, redact
from training import tracking
from training.jobs import JobSpec, job_for, make_config
from training.metrics import BEST_EPOCH, SWEEP_BEST, TRIALS_COMPLETE, TRIALS_PRUNED
from training.options import cli_fields, display_flag
from training.session import build_mlflow_model, reference_profile
from training.tracking import registry
from training.tracking.artifacts import BEST, BEST_ARTIFACT, MLFLOW_MODEL, MONITORING
from training.tracking.tags import JOB_TAG, REGISTERED_MODEL, SWEEP_ID, SWEEP_PREFIX, sweep_job
from training.trainer import StopCause, StopTraining, train

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
SPEC_KINDS = ("float", "log", "int", "intlog", "choice")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class SweepError(ValueError):
    """A sweep that cannot start: the message names the parameter, spec or option at fault."""


# --- the search space ------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class Dimension:
    name: str
    kind: str  # float | log | int | intlog | choice
    low: Any = None
    high: Any = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind in ("int", "intlog"):
            return trial.suggest_int(self.name, self.low, self.high, log=self.kind == "intlog")
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice:{','.join(map(str, self.choices))}"
        return f"{self.kind}:{self.low}:{self.high}"


def _field(job: JobSpec, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in cli_fields(job.config)}
    if name not in fields or name in ("tags", "experiment", "run_name", "out_dir", "registered_model"):
        known = ", ".join(sorted(n for n in fields if n not in ("tags", "out_dir")))
        raise SweepError(f"--param {name}: `train {job.kind}` has no option {name!r} to search; options: {known}")
    return fields[name]


def _convert(job: JobSpec, f: dataclasses.Field, raw: Any, spec: str) -> Any:
    """A value through the option's own Click type: the range and choices `train` would accept."""
    param_type = f.metadata["cli"].kwargs.get("type")
    if param_type is None and f.type in (bool, "bool"):
        param_type = click.BOOL
    if param_type is None:
        return raw
    try:
        return click.types.convert_type(param_type).convert(raw, None, None)
    except click.BadParameter as e:
        raise SweepError(f"--param {f.name}={spec}: {raw!r} is not a valid {display_flag(f)}: {e.message}") from e


def parse_dimension(job: JobSpec, name: str, spec: str) -> Dimension:
    f = _field(job, name)
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SPEC_KINDS:
        raise SweepError(f"--param {name}={spec}: expected one of {', '.join(k + ':...' for k in SPEC_KINDS)}")
    if kind == "choice":
        values = [v.strip() for v in rest.split(",") if v.strip()]
        if not values:
            raise SweepError(f"--param {name}={spec}: an empty choice")
        return Dimension(name=name, kind=kind, choices=tuple(_convert(job, f, v, spec) for v in values))
    bounds = rest.split(":")
    number = int if kind in ("int", "intlog") else float
    try:
        low, high = (number(b) for b in bounds)
    except ValueError as e:
        raise SweepError(f"--param {name}={spec}: expected {kind}:LOW:HIGH with {number.__name__} bounds") from e
    if not low < high:
        raise SweepError(f"--param {name}={spec}: an empty range (LOW must be below HIGH)")
    if kind in ("log", "intlog") and low <= 0:
        raise SweepError(f"--param {name}={spec}: a log range needs LOW > 0")
    return Dimension(name=name, kind=kind, low=_convert(job, f, low, spec), high=_convert(job, f, high, spec))


def read_space(job: JobSpec, params: tuple[str, ...], space_file: Path | None) -> list[Dimension]:
    """The search space from --param NAME=SPEC options and/or a YAML or TOML file of NAME: SPEC."""
    specs: dict[str, str] = {}
    if space_file is not None:
        text = space_file.read_text(encoding="utf-8")
        try:
            loaded = tomllib.loads(text) if space_file.suffix == ".toml" else yaml.safe_load(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise SweepError(f"--space {space_file}: not valid {space_file.suffix.lstrip('.') or 'YAML'}: {e}") from e
        if not isinstance(loaded, dict):
            raise SweepError(f"--space {space_file}: expected NAME: SPEC entries")
        specs.update({str(k): str(v) for k, v in loaded.items()})
    for item in params:
        name, sep, spec = item.partition("=")
        if not sep:
            raise SweepError(f"--param {item!r}: expected NAME=SPEC, e.g. lr=log:1e-3:1")
        specs[name.strip().replace("-", "_")] = spec.strip()
    if not specs:
        raise SweepError("give the search space: --param NAME=SPEC (repeatable) or --space FILE")
    return [parse_dimension(job, name, spec) for name, spec in specs.items()]


# --- the sweep's settings, resolved once in the launcher --------------------------------------------


@dataclass(kw_only=True)
class SweepSpec:
    kind: str
    fixed: dict[str, Any]  # options of `train KIND` given after `--` (and DATA)
    space: list[Dimension]
    trials: int
    study_name: str
    storage: str
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    direction: str = "maximize"
    metric: str  # the job's sweep metric (resolve_spec fills it)
    heartbeat_s: int = 10
    parent_run_id: str | None = None
    experiment: str = ""
    registered_model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def job(self) -> JobSpec:
        return job_for(self.kind)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "space": [dataclasses.asdict(d) for d in self.space]})

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        data = json.loads(text)
        data["space"] = [Dimension(**{**d, "choices": tuple(d["choices"])}) for d in data["space"]]
        return cls(**data)


def metric_direction(job: JobSpec) -> tuple[str, str]:
    """The per-epoch validation metric a sweep of this job optimizes, and which way is better."""
    metric = job.sweep_metric
    return metric.name, metric.direction


def default_study_name(kind: str, fixed: dict[str, Any], space: list[Dimension]) -> str:
    """The same command gives the same study (so running it again continues it)."""
    key = json.dumps({"fixed": fixed, "space": [d.describe() for d in space]}, sort_keys=True, default=str)
    return f"{kind}-sweep-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def resolve_spec(kind: str, fixed: dict[str, Any], space: list[Dimension], trials: int, direction: str | None,
                 **settings: Any) -> SweepSpec:  # fmt: skip
    job = job_for(kind)
    metric, natural = metric_direction(job)
    if direction is not None and direction != natural:
        better = "higher" if natural == "maximize" else "lower"
        raise SweepError(f"--direction {direction} contradicts {metric}, where {better} is better")
    clash = sorted(set(fixed) & {d.name for d in space})
    if clash:
        raise SweepError(f"{', '.join(clash)} is both searched (--param) and fixed (after --)")
    base = make_config(job, fixed)  # the fixed options are checked now, before any trial
    study_name = settings.pop("study_name", None) or default_study_name(kind, fixed, space)
    return SweepSpec(kind=kind, fixed=fixed, space=space, trials=trials, study_name=study_name, direction=natural,
                     metric=metric, experiment=base.experiment, registered_model=base.registered_model,
                     **settings)  # fmt: skip


# --- the study --------------------------------------------------------------------------------------


def _mark_failed_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose process died: its MLflow run is FAILED, tagged state=failed."""
    run_id = trial.user_attrs.get("run_id") or _find_trial_run(study.study_name, trial.number)
    if run_id:
        client = tracking.store_client()
        client.set_tag(run_id, "state", "failed")
        client.set_terminated(run_id, "FAILED")


def _find_trial_run(study_name: str, number: int) -> str | None:
    client = tracking.store_client()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.{SWEEP_ID} = '{study_name}' and tags.trial = '{number}'",
    )
    return runs[0].info.run_id if runs else None


def open_study(spec: SweepSpec, worker: int = 0) -> optuna.Study:
    if spec.storage.startswith("sqlite:///"):
        Path(spec.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        spec.storage, heartbeat_interval=spec.heartbeat_s, grace_period=3 * spec.heartbeat_s,
        failed_trial_callback=_mark_failed_run,
    )  # fmt: skip
    sampler = (optuna.samplers.TPESampler(seed=spec.seed + worker) if spec.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.seed + worker))  # fmt: skip
    pruner = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        "halving": optuna.pruners.SuccessiveHalvingPruner(),
        "none": optuna.pruners.NopPruner(),
    }[spec.pruner]
    return optuna.create_study(study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner,
                               direction=spec.direction, load_if_exists=True)  # fmt: skip


def _count(study: optuna.Study, *states: optuna.trial.TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def objective(spec: SweepSpec, trial: optuna.Trial, out_dir: Path) -> float:
    """One training run with the trial's values; its validation metric reported every epoch."""
    values = {d.name: d.suggest(trial) for d in spec.space}
    tags = {**spec.fixed.get("tags", {}), SWEEP_ID: spec.study_name, "trial": str(trial.number),
            "state": "running", MLFLOW_PARENT_RUN_ID: spec.parent_run_id or ""}  # fmt: skip
    given = {**spec.fixed, **values, "tags": tags, "run_name": f"trial-{trial.number}",
             "out_dir": str(out_dir)}  # fmt: skip
    config = make_config(spec.job, given)
    print(f"=> trial {trial.number}: {', '.join(f'{k}={v}' for k, v in values.items())}", flush=True)

    best: list[float] = []  # the trial's best value of the sweep metric: what the study optimizes

    def report(epoch: int, metrics: dict[str, float]) -> None:
        value = metrics[spec.metric]
        trial.report(value, epoch)
        if not best or (value > best[0] if spec.direction == "maximize" else value < best[0]):
            best[:] = [value]
        if trial.should_prune():
            raise StopTraining(f"pruned by the {spec.pruner} pruner at epoch {epoch} ({spec.metric} {value:.4g})",
                               StopCause.PRUNED)  # fmt: skip

    try:
        result = train(spec.job, config, on_epoch=report, register=False)
    except Exception:
        run_id = _find_trial_run(spec.study_name, trial.number)
        if run_id:
            tracking.store_client().set_tag(run_id, "state", "failed")
        raise
    trial.set_user_attr("run_id", result.run_id)
    pruned = result.stop_cause is StopCause.PRUNED
    tracking.store_client().set_tag(result.run_id, "state", "pruned" if pruned else "complete")
    if pruned:
        raise optuna.TrialPruned(result.stop_reason)
    return best[0]


def run_worker(spec: SweepSpec, worker: int = 0) -> None:
    """Run trials until the study has `spec.trials` complete or pruned ones (across all its workers)."""
    study = open_study(spec, worker)
    out_dir = Path(spec.fixed.get("out_dir", "runs")) / spec.study_name
    while _count(study, *FINISHED) < spec.trials:
        optuna.storages.fail_stale_trials(study)
        if _count(study, *FINISHED, optuna.trial.TrialState.RUNNING) >= spec.trials:
            time.sleep(spec.heartbeat_s)  # the last trials run elsewhere (or died: their heartbeat will say)
            continue
        study.optimize(lambda t: objective(spec, t, out_dir), n_trials=1, catch=(Exception,))


# --- the launcher: the parent run, the workers, the summary ----------------------------------------


def _parent_run(spec: SweepSpec) -> str:
    """The sweep's parent run: found by its sweep id (another machine or an earlier run of the
    command created it), or created now."""
    client = tracking.store_client()
    experiment_id = tracking.ensure_experiment(spec.experiment, client)
    query = f"tags.sweep_id = '{spec.study_name}' and tags.sweep_role = 'parent'"
    found = client.search_runs([experiment_id], query)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {SWEEP_ID: spec.study_name, "sweep_role": "parent", JOB_TAG: sweep_job(spec.kind)}
    run = client.create_run(experiment_id, run_name=spec.study_name, tags=tags)
    params = {"study_name": spec.study_name, "storage": redact(spec.storage), "sampler": spec.sampler,
              "pruner": spec.pruner, "direction": spec.direction, "metric": spec.metric, "trials": spec.trials,
              "seed": spec.seed,
              "space": json.dumps({d.name: d.describe() for d in spec.space}),
              "fixed": json.dumps({k: v for k, v in spec.fixed.items() if k != "tags"}, default=str)}  # fmt: skip
    tracking.DirectRun(client, run.info.run_id).log_params(params)
    return run.info.run_id


def _launch_workers(spec: SweepSpec, processes: int) -> list[int]:
    """`processes` worker processes on the study; return their exit codes."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "sweep.json"
        spec_file.write_text(spec.to_json(), encoding="utf-8")
        env = child_environment("training", extra={"PYTHONUNBUFFERED": "1"})
        workers = [
            subprocess.Popen([sys.executable, "-m", "training.sweep", str(spec_file), str(worker)], env=env)
            for worker in range(processes)
        ]
        print(f"=> {processes} worker processes: {' '.join(str(p.pid) for p in workers)}", flush=True)
        return [p.wait() for p in workers]


def summarize(spec: SweepSpec) -> dict[str, Any]:
    """Log the best trial and Optuna's plots to the parent run; register the best trial's model."""
    study = open_study(spec)
    client = tracking.store_client()
    parent = tracking.DirectRun(client, spec.parent_run_id)
    states = {s.name.lower(): _count(study, s) for s in optuna.trial.TrialState}
    summary: dict[str, Any] = {"study": spec.study_name, "trials": states, "parent_run_id": spec.parent_run_id}
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    parent.set_tags({f"trials_{name}": count for name, count in states.items() if count})
    if completed:
        best = study.best_trial
        best_run = best.user_attrs.get("run_id")
        parent.set_tags({"best_trial": best.number, "best_params": json.dumps(best.params), "best_run_id": best_run})
        parent.log_metrics({SWEEP_BEST: best.value, TRIALS_COMPLETE: states["complete"],
                            TRIALS_PRUNED: states["pruned"]}, step=len(study.trials))  # fmt: skip
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_run_id=best_run)
        if best_run:
            tags = {SWEEP_ID: spec.study_name, "trial": str(best.number),
                    spec.metric.replace("/", "_"): f"{best.value:.4f}"}  # fmt: skip
            version = register_trial(spec, best_run, tags, client)
            parent.set_tags({REGISTERED_MODEL: f"{spec.registered_model}/{version}"})
            summary["registered"] = f"{spec.registered_model}/{version}"
    _log_plots(study, parent)
    client.set_terminated(spec.parent_run_id, "FINISHED")
    return summary


def register_trial(spec: SweepSpec, run_id: str, tags: dict[str, str], client: Any) -> str:
    """Register a trial's best checkpoint as an MLflow model of its run (as a training run registers
    its own); the checkpoint is read from this machine's run folder, else from MLflow."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(spec.fixed.get("out_dir", "runs")) / spec.study_name / run_id / BEST
        checkpoint = local if local.is_file() else tracking.download_run_checkpoint(run_id, Path(tmp))
        if spec.job.serving is None:  # a job without inference code: the checkpoint file itself
            return tracking.register_model(run_id, BEST_ARTIFACT, spec.registered_model,
                                           {**tags, **registry.digest_tag(checkpoint)}, client)  # fmt: skip
        model_dir = build_mlflow_model(spec.job, checkpoint, Path(tmp) / MLFLOW_MODEL)
        profile = reference_profile(spec.job, checkpoint, Path(tmp) / MONITORING)
        if profile is not None:  # the drift checks' baseline, as a training run records it
            client.log_artifact(run_id, str(profile), MONITORING)
        step = int(client.get_run(run_id).data.metrics.get(BEST_EPOCH, 0))
        return registry.log_mlflow_model(
            client,
            run_id,
            model_dir,
            registered_name=spec.registered_model,
            tags=tags,
            step=step,
            source_key=f"{SWEEP_PREFIX}{spec.study_name}-{run_id}",
        )


def _log_plots(study: optuna.Study, parent: tracking.DirectRun) -> None:
    """Optuna's optimization history and parameter importances, as PNGs (matplotlib backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in (("optimization_history", plots.plot_optimization_history),
                           ("param_importances", plots.plot_param_importances)):  # fmt: skip
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
                print(f"=> no {name} picture: {e}", flush=True)
                continue
            path = Path(tmp) / f"{name}.png"
            axes.figure.set_size_inches(9, 5)
            axes.figure.tight_layout()
            axes.figure.savefig(path, dpi=90)
            matplotlib.pyplot.close(axes.figure)
            parent.log_artifact(path)


def run_sweep(spec: SweepSpec, *, processes: int) -> dict[str, Any]:
    study = open_study(spec)  # created here once, before any worker starts
    spec.parent_run_id = _parent_run(spec)
    study.set_user_attr("parent_run_id", spec.parent_run_id)
    print(f"=> study {spec.study_name} in {redact(spec.storage)}: {_count(study, *FINISHED)} of {spec.trials} trials "
          f"done; optimizing {spec.metric} ({spec.direction}); MLflow parent run {spec.parent_run_id}",
          flush=True)  # fmt: skip
    if processes == 1:
        run_worker(spec)
    else:
        codes = _launch_workers(spec, processes)
        if any(codes):
            print(f"=> worker exit codes {codes}: trials of a worker that died are failed and run again", flush=True)
    summary = summarize(spec)
    trials = summary["trials"]
    best = (f"best trial {summary['best_trial']}: {spec.metric} {summary['best_value']:.4g} with "
            f"{summary['best_params']}" if "best_trial" in summary else "no complete trial")  # fmt: skip
    print(f"=> sweep {spec.study_name}: {trials.get('complete', 0)} complete, {trials.get('pruned', 0)} pruned, "
          f"{trials.get('fail', 0)} failed; {best}" + (f"; registered {summary['registered']}"
                                                        if "registered" in summary else ""), flush=True)  # fmt: skip
    return summary


def main() -> None:
    """A worker process: `python -m training.sweep SPEC.json WORKER_INDEX`."""
    spec = SweepSpec.from_json(Path(sys.argv[1]).read_text(encoding="utf-8"))
    run_worker(spec, int(sys.argv[2]))


if __name__ == "__main__":
    main()
