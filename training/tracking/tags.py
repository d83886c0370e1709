"""Run tags that one part of dlops writes and another reads: declared once, here.

job            what the run is: train-<kind> (a training run of a job), sweep-<kind> (a sweep's
               parent), evaluate, compare, deployment (a deploy's run: release/history.py), monitor
               (a drift or feedback check: monitoring/runs.py)
deploy_outcome, deploy_reason   how a deploy ended (deployed, promoted, aborted, inconclusive,
                     interrupted, failed) and why, for people
sweep_id       the sweep (Optuna study) a trial or parent belongs to
comparison_id  the device benchmark a run belongs to (bench_config: its configuration)
source_run_id  the training run an evaluation evaluated (source_run_a/_b: a comparison's two)
stop_reason    why the run ended, for people
node_lost      where a multi-node run lost a peer process or node, and what the collective said
restarts       how many times the run was resumed by its restarted process group (torchrun's --max-restarts)
dlops_local_run_id   an offline run's local id (its server-side run is found again by it)
registered_model     NAME/VERSION of the version the run's best checkpoint became

Model-version tags:
checkpoint_sha256  the SHA-256 of the version's checkpoint file, recorded when it is registered;
                   `dlops package` and `dlops deploy` refuse a download that does not match it
deployment_run     the MLflow run (experiment `deployments`) of the version's last deploy
canary_aborted     why a canary of the version was aborted: the controller does not try it again
drift_verdict      the last drift check's verdict (drift, no drift, not enough data); also on its run
monitor_run        the MLflow run (experiment `monitoring`) of the version's last drift or feedback check

And one registry alias:
serving            the version of a model that `dlops serve` starts and `dlops deploy` moves
"""

from __future__ import annotations

from collections.abc import Mapping

JOB_TAG = "job"
EVALUATE, COMPARE, DEPLOYMENT, MONITOR = "evaluate", "compare", "deployment", "monitor"
OUTCOME, REASON = "deploy_outcome", "deploy_reason"
SWEEP_ID = "sweep_id"
COMPARISON_ID, BENCH_CONFIG = "comparison_id", "bench_config"
SOURCE_RUN_TAG = "source_run_id"
STOP_REASON = "stop_reason"
NODE_LOST, RESTARTS = "node_lost", "restarts"
TRAIN_PREFIX, SWEEP_PREFIX = "train-", "sweep-"
CHECKPOINT_DIGEST = "checkpoint_sha256"
LOCAL_RUN_ID = "dlops_local_run_id"  # an offline run's own id, on the server-side run made at delivery
REGISTERED_MODEL = "registered_model"  # the version a run's best checkpoint became: NAME/VERSION
SERVING_ALIAS = "serving"
DEPLOYMENT_RUN = "deployment_run"
CANARY_ABORTED = "canary_aborted"
DRIFT_VERDICT, MONITOR_RUN = "drift_verdict", "monitor_run"


def training_job(kind: str) -> str:
    """The job tag of a training run of `kind`."""
    return TRAIN_PREFIX + kind


def sweep_job(kind: str) -> str:
    """The job tag of a sweep's parent run over `kind`."""
    return SWEEP_PREFIX + kind


def trained_kind(tags: Mapping[str, str]) -> str | None:
    """The kind of job a training run trained, from its tags; None for any other run."""
    job = tags.get(JOB_TAG, "")
    return job.removeprefix(TRAIN_PREFIX) if job.startswith(TRAIN_PREFIX) else None
