"""What a job that serves declares: its handler and model code, and the adapter between a request and
an answer that packaging, deploys, MLflow models and `dlops predict` use.

    Serving(name="tabular", handler=HERE / "tabular_classifier.py", handler_class="TabularClassifier",
            model_file=HERE / "mlp.py", inference_keys=("features", "classes", "mean", "std"),
            input="text", request_field="row", example_request=mean_row)

The adapter, each part with a default but the example request:
    example_request(meta)              one request as named fields, from the checkpoint's inference
                                       entries: what a deploy checks, an MLflow model's input example
    offline_answer(state, request, amp)  the answer computed here from the checkpoint; default: the
                                       job's own handler, loaded in this process (the deploy check then
                                       proves the packaging; a job with an independent implementation,
                                       as the built-ins have, proves the handler too)
    answer_mismatch(served, offline, amp)  why a served answer differs; default: numbers within 1e-4
    http_request(given, fields)        what `dlops predict INPUT` sends; default: a file's bytes
                                       (input "file"), or JSON {request_field: INPUT, **fields}

and, to be watched once served (docs/monitoring.md), a Monitoring declaration: which requests stand
for its validation data, which of its handler's summaries drift is judged on, what quality means.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serving
import training.hardware

# The code every served model ships beside its handler (serving/handlers/): loading, batching, errors
COMMON_HANDLER_FILES = ("handler_common.py", "request_fields.py", "prediction_log.py")
HANDLERS = Path(serving.__file__).resolve().parent / "handlers"
TOLERANCE = 1e-4  # the default answer_mismatch: rounding between two computations of the same numbers


@dataclass(frozen=True, kw_only=True)
class Request:
    """One HTTP request to a served model."""

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def numbers_close(served: Any, offline: Any, tolerance: float = TOLERANCE) -> str | None:
    """Where two JSON-like answers differ (numbers within `tolerance`), or None."""
    if isinstance(served, int | float) and isinstance(offline, int | float) and not isinstance(served, bool):
        return None if math.isclose(served, offline, abs_tol=tolerance) else f"{served} != {offline}"
    if isinstance(served, dict) and isinstance(offline, dict):
        if served.keys() != offline.keys():
            return f"fields {sorted(served)} != {sorted(offline)}"
        return next((f"{k}: {d}" for k in offline if (d := numbers_close(served[k], offline[k], tolerance))), None)
    if isinstance(served, list) and isinstance(offline, list):
        if len(served) != len(offline):
            return f"{len(served)} items != {len(offline)}"
        return next((f"[{i}] {d}" for i, (a, b) in enumerate(zip(served, offline, strict=True))
                     if (d := numbers_close(a, b, tolerance))), None)  # fmt: skip
    return None if served == offline else f"{served!r} != {offline!r}"


@dataclass(frozen=True, kw_only=True)
class Quality:
    """What `dlops feedback` measures: the share of logged answers whose `answer_field` equals the truth."""

    answer_field: str = "class"
    name: str = "accuracy"
    registered_metric: str | None = None  # the training run's figure of the same quality, shown beside it
    registered_scale: float = 1.0  # that metric in the unit of `name` (a percentage: 0.01)


@dataclass(frozen=True, kw_only=True)
class Monitoring:
    """How a served version of the job is watched. The handler's summarize() says what a request's summary
    holds; this says which parts drift is judged on and how, and what quality means.

    reference_requests(state, n)  up to n requests made from the checkpoint's validation data (its
                                  config names the data): profiled when a version is registered
    numeric                       summary["input"] numbers compared column by column (Kolmogorov-Smirnov);
                                  None: every number the summary holds (a table's features)
    categorical                   summary["answer"] fields compared as categories (the predicted class)
    embedding                     a summary["input"] list compared as one embedding (Evidently's
                                  EmbeddingsDrift: a classifier told to tell the two sets apart)
    p_value                       a column drifted when its test's p-value is under this
    drift_share                   "drift" when at least this share of the columns drifted, or
    embedding_auc                 the embedding's classifier told the two sets apart with a ROC AUC above it
    """

    reference_requests: Callable[[dict[str, Any], int], list[dict[str, Any]]]
    numeric: tuple[str, ...] | None = None
    categorical: tuple[str, ...] = ()
    embedding: str | None = None
    p_value: float = 0.05
    drift_share: float = 0.5
    embedding_auc: float = 0.55
    min_requests: int = 50  # fewer logged requests in a window: "not enough data", never "no drift"
    reference_size: int = 300
    quality: Quality | None = None


@dataclass(frozen=True, kw_only=True)
class Serving:
    name: str  # the TorchServe model name: /predictions/<name>
    handler: Path  # the handler module (a BaseHandler of serving/handlers/handler_common.py)
    handler_class: str  # its class: TorchServe's entry point and the MLflow pyfunc model's
    model_file: Path  # the module that builds the model, shipped as dlops_<its name>
    example_request: Callable[[dict[str, Any]], dict[str, Any]]
    inference_keys: tuple[str, ...] = ()  # the run's attributes inference needs beside weights and model_config
    input: str = "file"  # what `dlops predict INPUT` takes: "file" (a path) or "text" (the input itself)
    request_field: str = "input"  # input "text": the JSON field INPUT goes in
    offline_answer: Callable[[dict[str, Any], dict[str, Any], str], Any] | None = None
    answer_mismatch: Callable[[Any, Any, str], str | None] = lambda served, offline, amp: numbers_close(served, offline)
    http_request: Callable[[str, dict[str, Any]], Request] | None = None
    extra_files: tuple[Path, ...] = ()  # more modules the handler imports, shipped under their own names
    # The job's canary thresholds: keys of release/canary.py's CanaryPolicy it sets for its own versions
    # (a --policy file still overrides them), e.g. {"max_p99_ratio": 3.0}
    canary: dict[str, Any] = field(default_factory=dict)
    monitoring: Monitoring | None = None  # None: served versions are counted and timed, not judged for drift

    def files(self) -> dict[Path, str]:
        """The code a .mar or an MLflow model of this job ships: source file -> name inside it. None of
        it imports this project (a served model needs torch, and what the job's own code imports)."""
        return {
            self.handler: self.handler.name,
            **{HANDLERS / name: name for name in COMMON_HANDLER_FILES},
            Path(training.hardware.__file__).resolve(): "dlops_hardware.py",
            self.model_file: f"dlops_{self.model_file.name}",
            **{path: path.name for path in self.extra_files},
        }

    def request(self, given: str, fields: dict[str, Any]) -> Request:
        """What `dlops predict` sends for INPUT `given` and the fields the user added."""
        if self.http_request is not None:
            return self.http_request(given, fields)
        if self.input == "file":
            return Request(body=Path(given).read_bytes(), content_type="application/octet-stream",
                           headers={f"X-{k.title()}": str(v) for k, v in fields.items()})  # fmt: skip
        return Request(body=json.dumps({self.request_field: given, **fields}).encode("utf-8"),
                       content_type="application/json")  # fmt: skip

    def answer(self, state: dict[str, Any], request: dict[str, Any], amp: str = "off") -> Any:
        """The answer to `request` from checkpoint `state`, computed in this process."""
        if self.offline_answer is not None:
            return self.offline_answer(state, request, amp)
        (answer,) = self.loaded_handler(state, amp).answer([request])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def profile(self, state: dict[str, Any], requests: list[dict[str, Any]], batch: int = 32) -> list[dict]:
        """The summaries the job's handler makes of `requests` (those it answers), as it makes them when
        serving (at the precision `dlops serve --amp auto` picks on this machine, so that a barely trained
        model's near-ties fall the same way): what a reference profile and the prediction log both hold."""
        handler = self.loaded_handler(state, "auto")
        handler.summarizing = True
        summaries = []
        for start in range(0, len(requests), batch):
            handler.answer(requests[start : start + batch])
            summaries += [summary for summary in handler.summaries if summary is not None]
        return summaries

    def loaded_handler(self, state: dict[str, Any], amp: str) -> Any:
        """The job's handler with the checkpoint's model loaded, on the CPU."""
        import torch

        handler = self.load_handler()
        meta = {key: state[key] for key in self.inference_keys} | {"model_config": state["model_config"]}
        handler.load(meta, state["model"], torch.device("cpu"), amp)
        return handler

    def mismatch(self, served: Any, offline: Any, amp: str = "off") -> str | None:
        return self.answer_mismatch(served, offline, amp)

    def load_handler(self) -> Any:
        """An instance of the job's handler class, imported from the files a .mar ships, under the names they
        have there (the folder stays importable while this process lives: handlers import lazily)."""
        folder = Path(tempfile.mkdtemp(prefix="dlops-handler-"))
        atexit.register(shutil.rmtree, folder, True)
        for source, name in self.files().items():
            (folder / name).write_bytes(source.read_bytes())
        sys.path.append(str(folder))
        spec = importlib.util.spec_from_file_location(self.handler.stem, folder / self.handler.name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, self.handler_class)()
