"""The model: a multi-layer perceptron over standardized table columns. Shipped inside every .mar and
MLflow model as `dlops_mlp.py` (the handler imports it by that name): it imports torch only."""

from __future__ import annotations

import json

from torch import nn

FLOAT32_MAX = 3.4028234663852886e38  # the largest value the model's float32 inputs hold


def build_mlp(*, inputs: int, hidden: int, layers: int, classes: int, dropout: float = 0.0) -> nn.Sequential:
    """`layers` hidden layers of `hidden` units (ReLU, dropout), then one logit per class."""
    blocks: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*blocks, nn.Linear(width, classes))


def row_values(row: object, features: list[str]) -> list[float]:
    """One table row as numbers in the columns' order: from an object of column -> value, a list in
    the columns' order, that list as comma-separated text, or either as JSON text. ValueError names
    what is wrong."""
    if isinstance(row, str) and row.lstrip().startswith(("{", "[")):  # JSON text: an object or a list
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise ValueError(f"'row' is not valid JSON: {e}") from None
    if isinstance(row, str):
        row = [part.strip() for part in row.split(",")]
    if isinstance(row, dict):
        missing = [name for name in features if name not in row]
        if missing:
            raise ValueError(f"'row' lacks the column(s) {missing}; the model reads {features}")
        row = [row[name] for name in features]
    if not isinstance(row, list) or len(row) != len(features):
        raise ValueError(f"'row' needs {len(features)} values, one per column: {', '.join(features)}")
    values = []
    for name, value in zip(features, row, strict=True):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past any float (10**400)
            raise ValueError(f"column {name!r}: {str(value)[:40]!r} is not a number a float holds") from None
        if not abs(number) <= FLOAT32_MAX:  # NaN and infinities too: the model reads float32
            raise ValueError(f"column {name!r}: {str(value)[:40]!r} is not a finite number within "
                             f"+-{FLOAT32_MAX:.4g}")  # fmt: skip
        values.append(number)
    return values
