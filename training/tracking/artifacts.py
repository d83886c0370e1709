"""What a run's folder and its MLflow artifacts hold, named once: the trainer writes them; reports,
sweeps, packaging and `--resume auto` read them.

    RUN_DIR/best.pt, RUN_DIR/last.pt      the best epoch's and the latest checkpoint
    checkpoints/best.pt, checkpoints/last.pt   the same, as the run's artifacts
    learning_curves.png, model_summary.txt     the run's pictures and layer table
    tensorboard/                          the TensorBoard event files
    serving/<name>-<version>.mar          archives packaged from the run
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
