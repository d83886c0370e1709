"""Every environment variable the project reads or sets, named once.

It sits at the bottom of the layers so the trainer, the tracking code, the servers, the container's
entry point, the benchmarks and the scripts all read the same names. Two kinds live here: MLflow's
own variables (its client and server read them; we set or read them) and ours (DLOPS_*). Two files
cannot import this one and spell their variables themselves, as tests/test_contracts.py lists: the
handlers and the hardware facts, both shipped inside every .mar where the project is not installed.
"""

from __future__ import annotations

# MLflow's client: where runs go, who logs them, which CA to trust, how hard to retry
TRACKING_URI = "MLFLOW_TRACKING_URI"
TRACKING_USERNAME, TRACKING_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"
TRACKING_CA = "MLFLOW_TRACKING_SERVER_CERT_PATH"
HTTP_MAX_RETRIES, HTTP_TIMEOUT = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
ARTIFACTS_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

# MLflow's server (`mlflow server` and its basic-auth app)
BACKEND_STORE_URI = "MLFLOW_BACKEND_STORE_URI"  # `mlflow server` reads --backend-store-uri from it
ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_PASSWORD"  # the first admin's password
AUTH_CONFIG_PATH = "MLFLOW_AUTH_CONFIG_PATH"
FLASK_SECRET_KEY = "MLFLOW_FLASK_SERVER_SECRET_KEY"
ALLOWED_HOSTS = "MLFLOW_ALLOWED_HOSTS"
SOURCE_REGEX = "MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"
JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"

# MLflow's system metrics: the node id a machine's are logged under (system/NODE/...)
SYSTEM_METRICS_NODE_ID = "MLFLOW_SYSTEM_METRICS_NODE_ID"

# ours: training
OFFLINE = "DLOPS_OFFLINE"  # journal only, deliver later with `dlops sync`
NODES = "DLOPS_NODES"  # the launcher's resolved nodes (JSON), for the processes torchrun starts
SYNC_TIMEOUT = "DLOPS_SYNC_TIMEOUT"
CACHE_DIR = "DLOPS_CACHE_DIR"  # where decoded image caches live
WEIGHTS_MIRROR = "DLOPS_TORCHVISION_WEIGHTS_URL"
SWEEP_STORAGE = "DLOPS_SWEEP_STORAGE"  # Optuna's database URL
ARTIFACT_STORES = "DLOPS_ARTIFACT_STORES"  # where registered models may come from

# ours: serving (the handlers read the first five inside TorchServe's workers)
TORCH_THREADS = "DLOPS_TORCH_THREADS"
SERVE_AMP = "DLOPS_SERVE_AMP"
# the prediction log (serving/handlers/prediction_log.py reads them): folder, sampled share, file cap
PREDICTION_LOG, PREDICTION_SAMPLE = "DLOPS_PREDICTION_LOG", "DLOPS_PREDICTION_SAMPLE"
PREDICTION_LOG_MB = "DLOPS_PREDICTION_LOG_MB"
INFERENCE_URL, INFERENCE_KEY = "DLOPS_INFERENCE_URL", "DLOPS_INFERENCE_KEY"
INFERENCE_KEY_FILE, INFERENCE_CA = "DLOPS_INFERENCE_KEY_FILE", "DLOPS_INFERENCE_CA"

# ours: the serving container's entry point (docker/compose.yaml sets them)
SERVE_STATE_DIR, SERVE_MODEL_STORE = "DLOPS_SERVE_STATE_DIR", "DLOPS_SERVE_MODEL_STORE"
SERVE_TOKEN_MINUTES = "DLOPS_SERVE_TOKEN_EXPIRATION_MIN"
SERVE_TORCH_THREADS = "DLOPS_SERVE_TORCH_THREADS"
SERVE_LOG_SAMPLE = "DLOPS_SERVE_LOG_SAMPLE"  # the prediction log's share (dlops serve --log-sample)
SERVE_TLS_PREFIX = "DLOPS_SERVE_TLS_"  # + CERT, KEY, CA
# a fleet in compose: its folder (bind-mounted at the same path as on the host: sockets and paths
# in it are the host's too), its members' names (the gateway's), the gateway's published port
FLEET_DIR, FLEET_MEMBERS, FLEET_PORT = "DLOPS_FLEET_DIR", "DLOPS_FLEET_MEMBERS", "DLOPS_FLEET_PORT"
