"""The tabular job's handler, for TorchServe and for the MLflow pyfunc model: one table row in,
class probabilities out.

Runs from inside a .mar (or an MLflow model's code/) next to `handler_common.py` and
`request_fields.py` (dlops' shared handler code), `dlops_mlp.py` (this package's mlp.py) and
`meta.json` (the feature columns, the classes, the training split's column means and deviations);
it needs torch only.

Request: JSON {"row": ROW, "topk": N}; ROW is an object of column -> number, a list of numbers in
the columns' order, or that list as comma-separated text. Answer: [{"class", "probability"}, ...],
best first.
"""

from __future__ import annotations

import torch
from dlops_mlp import build_mlp, row_values
from handler_common import BadRequest, BaseHandler
from request_fields import Field


class TabularClassifier(BaseHandler):
    def build_model(self, model_config: dict) -> torch.nn.Module:
        return build_mlp(**model_config)

    def setup(self) -> None:
        self.mean, self.std = torch.tensor(self.meta["mean"]), torch.tensor(self.meta["std"])

    def prepare(self, fields: dict) -> tuple[torch.Tensor, int]:
        unknown = sorted(set(fields) - {"row", "topk"})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; accepted: ['row', 'topk']")
        try:
            values = row_values(fields.get("row"), self.meta["features"])
        except ValueError as e:
            raise BadRequest(str(e)) from e
        classes = len(self.meta["classes"])
        k = Field(name="topk", kind=int, default=min(3, classes), help="classes to return", low=1, high=classes)
        topk = k.check(fields["topk"]) if fields.get("topk") is not None else k.default_value()
        return (torch.tensor(values) - self.mean) / self.std, topk

    def infer(self, inputs: list[tuple[torch.Tensor, int]]) -> list[list[dict]]:
        rows = torch.stack([row for row, _ in inputs]).to(self.device)
        probabilities = torch.softmax(self.model(rows).float(), dim=1).cpu()
        return [top_k(p, k, self.meta["classes"]) for p, (_, k) in zip(probabilities, inputs, strict=True)]

    def summarize(self, inputs: list[tuple[torch.Tensor, int]], answers: list[list[dict]]) -> list[dict]:
        """A table's summary is its row: each feature as sent (un-standardized), and the top class."""
        summaries = []
        for (row, _), answer in zip(inputs, answers, strict=True):
            values = (row * self.std + self.mean).tolist()
            summary = {name: round(v, 6) for name, v in zip(self.meta["features"], values, strict=True)}
            summaries.append({"input": summary, "answer": {"class": answer[0]["class"],
                                                           "probability": answer[0]["probability"]}})  # fmt: skip
        return summaries


def top_k(probabilities: torch.Tensor, k: int, classes: list[str]) -> list[dict]:
    values, indices = probabilities.topk(k)
    return [{"class": classes[c], "probability": round(float(p), 6)}
            for p, c in zip(values.tolist(), indices.tolist(), strict=True)]  # fmt: skip
