"""What a run's folder and its MLflow artifacts hold, named once: the trainer writes them; reports,
sweeps, packaging and `--resume auto` read them.

    RUN_DIR/best.pt, RUN_DIR/last.pt      the best epoch's and the latest checkpoint
    checkpoints/best.pt, checkpoints/last.pt   the same, as the run's artifacts
    learning_curves.png, model_summary.txt     the run's pictures and layer table
    tensorboard/                          the TensorBoard event files
    serving/<name>-<version>.mar          archives packaged from the run
    monitoring/reference.jsonl            the registered version's reference profile: its validation data
                                          summarized as its handler summarizes requests (drift checks)

and, in the run folder only, the tracking journal (training/tracking/journal.py):

    journal/records.jsonl, journal/spool/, journal/delivered, journal/run.json, journal/lock
"""

from __future__ import annotations

BEST, LAST = "best.pt", "last.pt"
CHECKPOINTS = "checkpoints"
BEST_ARTIFACT = f"{CHECKPOINTS}/{BEST}"
LEARNING_CURVES = "learning_curves.png"
MODEL_SUMMARY = "model_summary.txt"
TENSORBOARD = "tensorboard"
ARCHIVES = "serving"
MLFLOW_MODEL = "mlflow-model"  # in the run folder: the MLflow model built from best.pt
MONITORING = "monitoring"
REFERENCE_PROFILE = "reference.jsonl"  # under MONITORING, in the run folder and as an artifact
JOURNAL, JOURNAL_RECORDS, JOURNAL_SPOOL = "journal", "records.jsonl", "spool"
NODE_METRICS = "node-metrics"  # in a multi-node run's folder: NODE_METRICS/<node>/journal, each node's system metrics
JOURNAL_DELIVERED, JOURNAL_STATE, JOURNAL_LOCK = "delivered", "run.json", "lock"
