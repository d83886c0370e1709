"""Experiment tracking: the MLflow store (store.py), and training runs logged through a durable
journal (journal.py) that a background sender delivers (sender.py, run.py)."""

from training.tracking.journal import Journal, JournalBusy, find_journals, server_run_id
from training.tracking.run import NullTracker, RunTracker, end_abandoned, node_system_metrics, open_run
from training.tracking.store import (
    DirectRun,
    TrackingRefused,
    TrackingUnavailable,
    check_reachable,
    download_run_checkpoint,
    ensure_experiment,
    environment_tags,
    find_run,
    initialize_store,
    log_text_to_run,
    register_model,
    start_run,
    store_client,
    tracking_uri,
)

__all__ = [
    "DirectRun",
    "Journal",
    "JournalBusy",
    "NullTracker",
    "RunTracker",
    "TrackingRefused",
    "TrackingUnavailable",
    "check_reachable",
    "download_run_checkpoint",
    "end_abandoned",
    "ensure_experiment",
    "environment_tags",
    "find_journals",
    "find_run",
    "initialize_store",
    "log_text_to_run",
    "node_system_metrics",
    "open_run",
    "register_model",
    "server_run_id",
    "start_run",
    "store_client",
    "tracking_uri",
]
