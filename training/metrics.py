"""Metric names every run and sweep logs, named once: the trainer writes them, reports, sweeps, the
registry and promotion read them. A job's own metrics are Metric declarations in its spec.

    train/loss, val/loss           each epoch (the job's train_epoch and evaluate return them)
    lr, time/epoch_seconds         each epoch (the trainer)
    time/total_seconds, time/to_best_seconds, best/epoch, best/<metric>   at the end (the trainer)
    eval/<metric>                  a `dlops evaluate` run
    best/value, trials/complete, trials/pruned   a sweep's parent run
    system/...                     MLflow's system metrics, sampled on their own clock
"""

from __future__ import annotations

from dataclasses import dataclass


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


TRAIN_LOSS = "train/loss"
VAL_LOSS = Metric(name="val/loss", label="val loss", higher_is_better=False)  # what early stopping watches
LR = "lr"
EPOCH_SECONDS = "time/epoch_seconds"
TOTAL_SECONDS = "time/total_seconds"
TO_BEST_SECONDS = "time/to_best_seconds"
BEST_EPOCH = "best/epoch"
EVAL_PREFIX = "eval/"
SYSTEM_PREFIX = "system/"  # MLflow's own name for them, which its UI charts as system metrics
SWEEP_BEST = "best/value"
TRIALS_COMPLETE, TRIALS_PRUNED = "trials/complete", "trials/pruned"


def best_metric_name(metric: str) -> str:
    """The run metric holding a validation metric's value at the best epoch: val/acc1 -> best/val_acc1."""
    return "best/" + metric.replace("/", "_")


def eval_metric_name(metric: str) -> str:
    """How an evaluation run logs a metric: val/acc1 -> eval/acc1."""
    return EVAL_PREFIX + metric.split("/", 1)[-1]
