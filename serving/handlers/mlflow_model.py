"""The MLflow pyfunc model of every registered version (MLflow's models-from-code).

    model = mlflow.pyfunc.load_model("models:/resnet-tinyimagenet@champion")
    model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()], "topk": [3]}))
    # -> [[{"class": "n02123045", "label": "tabby, tabby cat", "probability": 0.41}, ...]]
    model = mlflow.pyfunc.load_model("models:/wordlm-wikitext2@champion")
    model.predict(pd.DataFrame({"prompt": ["the meaning of"], "max_words": [20], "temperature": [1.0], "seed": [1]}))
    # -> [{"text": "...", "words": 20, "unknown_words": []}]

One row is one request, its columns the request's fields; each row is answered as TorchServe's
handler answers the same request (the same handler class runs here, named in the model config),
in fp32. The model's artifact is an inference checkpoint (weights, model config and what
inference needs), loaded with torch.load(weights_only=True); the handler and the model
definition travel in the model's code/ folder, so loading needs torch, torchvision, Pillow and
pandas, not this project.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _plain(value: Any) -> Any:
    """A DataFrame cell as the Python value a JSON request would hold (numpy scalars -> int/float/bytes)."""
    if hasattr(value, "item") and not isinstance(value, bytes | bytearray):
        value = value.item()
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class DlopsModel(PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config  # {"handler": module name, "handler_class": class name}
        state = torch.load(context.artifacts["checkpoint"], map_location="cpu", weights_only=True)
        meta = {key: value for key, value in state.items() if key != "model"}
        self.handler = getattr(importlib.import_module(config["handler"]), config["handler_class"])()
        self.handler.load(meta, state["model"], torch.device("cpu"), amp="off")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list:
        rows = model_input.to_dict("records")
        requests = [{key: _plain(value) for key, value in row.items() if not _missing(value)} for row in rows]
        answers = self.handler.answer(requests)
        for index, answer in enumerate(answers):
            if isinstance(answer, Exception):
                raise MlflowException(f"row {index}: {answer}", error_code=INVALID_PARAMETER_VALUE)
        return answers


set_model(DlopsModel())
