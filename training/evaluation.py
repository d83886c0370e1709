"""`dlops evaluate`: the job's own evaluation where its spec declares one (a classifier's Acc@1 on
any split, an LM's perplexity), else the one every job has: its run's validation, on DATA prepared
as a run of the checkpoint's options prepares it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from training.jobs.evaluate import EvaluateOptions, evaluation_run
from training.jobs.spec import JobSpec
from training.metrics import eval_metric_name
from training.trainer import start_runtime


def evaluate_checkpoint(spec: JobSpec, state: dict[str, Any], source: str, data: Path,
                        options: EvaluateOptions) -> None:  # fmt: skip
    """Evaluate checkpoint `state` (named `source`) on DATA and log it as an MLflow run."""
    if spec.evaluate is not None:
        spec.evaluate(spec, state, source, data, options)
        return
    if options.split != "val":
        raise ValueError(f"--split {options.split}: the {spec.kind} job evaluates the validation data its runs "
                         "use (val)")  # fmt: skip
    known = {f.name for f in dataclasses.fields(spec.config)}
    saved = {k: v for k, v in state["config"].items() if k in known and k != "amp_requested"}
    config = spec.config(**{**saved, "data": str(data), "device": options.device, "amp": options.amp})
    runtime, config = start_runtime(config)
    run = spec.run(spec=spec, config=config, runtime=runtime)
    run.build_data()
    model = spec.build_model(**state["model_config"])
    model.load_state_dict(state["model"])
    metrics = run.evaluate(model.to(runtime.device).eval(), None)
    print("=> " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()), flush=True)
    with evaluation_run(state, source=source, data=data, split=options.split, device_name=runtime.choice.name,
                        experiment=config.experiment) as logged:  # fmt: skip
        logged.log_metrics({eval_metric_name(name): value for name, value in metrics.items()}, step=0)
