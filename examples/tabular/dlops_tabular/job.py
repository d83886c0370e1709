"""The tabular job: rows of a CSV table -> an MLP -> the class in one column.

    DATA/train.csv, DATA/val.csv    a header row; numeric feature columns and a class column (--label)

What is specific to a table is here: its options (TabularConfig), reading the CSV, one epoch of
training and of validation (TabularRun), and the one request a deploy checks (the mean row). The
framework does the rest from the declarations in SPEC: the report, the learning curves, the epoch
line, `dlops evaluate`, what serving stores and how `dlops predict` sends a row. SPEC is the
`tabular` entry point of the `dlops.jobs` group in this package's pyproject.toml.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from dlops_tabular import mlp
from training.jobs import JobRun, JobSpec, Metric, Monitoring, Optimization, Quality, RunConfig, Serving
from training.jobs.run import EpochContext
from training.metrics import TRAIN_LOSS, VAL_LOSS
from training.options import option

HERE = Path(__file__).resolve().parent
ACCURACY = Metric(name="val/acc", label="val accuracy (%)", higher_is_better=True)


@dataclass(frozen=True, kw_only=True)
class TabularConfig(RunConfig):
    label: str = option("label", help="the CSV column holding the class")
    hidden: int = option(64, type=click.IntRange(1), help="units per hidden layer")
    layers: int = option(2, type=click.IntRange(0), help="hidden layers")
    dropout: float = option(0.1, type=click.FloatRange(0, 1, max_open=True))
    lr: float = option(0.01, type=click.FloatRange(0, min_open=True), help="Adam's learning rate")
    weight_decay: float = option(1e-4, type=click.FloatRange(0))
    batch_size: int = option(64, "-b", "--batch-size", type=click.IntRange(1))
    epochs: int = option(20, type=click.IntRange(1), resumable=True)
    experiment: str = option("tabular")
    registered_model: str = option("tabular-mlp")


@dataclass(frozen=True, kw_only=True)
class Table:
    features: list[str]
    x: torch.Tensor  # (rows, features) float
    labels: list[str]


def read_table(path: Path, label: str) -> Table:
    """A CSV file's numeric columns and its class column; ValueError names the file, row and column."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (the table needs train.csv and val.csv)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or label not in reader.fieldnames:
            raise ValueError(f"{path}: no column {label!r} (the class; --label names another)")
        features = [name for name in reader.fieldnames if name != label]
        rows, labels = [], []
        for number, record in enumerate(reader, start=2):
            try:
                rows.append(mlp.row_values({name: record[name] for name in features}, features))
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: {e}") from e
            labels.append(record[label])
    if not rows:
        raise ValueError(f"{path}: no rows")
    return Table(features=features, x=torch.tensor(rows), labels=labels)


class TabularRun(JobRun):
    """An MLP classifying the rows of a CSV table (DATA/train.csv, DATA/val.csv)."""

    config: TabularConfig

    def build_data(self) -> dict[str, Any]:
        c, root = self.config, Path(self.config.data)
        train, val = read_table(root / "train.csv", c.label), read_table(root / "val.csv", c.label)
        if val.features != train.features:
            raise ValueError(f"{root}: val.csv has the columns {val.features}, train.csv {train.features}")
        self.features, self.classes = train.features, sorted(set(train.labels))
        unseen = sorted(set(val.labels) - set(self.classes))
        if unseen:
            raise ValueError(f"{root / 'val.csv'}: classes not in train.csv: {unseen}")
        self.mean, self.std = train.x.mean(0), train.x.std(0).clamp_min(1e-6)
        self.train_x, self.train_y = self._standardized(train), self._targets(train)
        self.val_x, self.val_y = self._standardized(val), self._targets(val)
        return {"dataset": str(root.resolve()), "train_rows": len(train.labels), "val_rows": len(val.labels)}

    def _standardized(self, table: Table) -> torch.Tensor:
        return ((table.x - self.mean) / self.std).to(self.device)

    def _targets(self, table: Table) -> torch.Tensor:
        return torch.tensor([self.classes.index(label) for label in table.labels], device=self.device)

    def model_config(self) -> dict[str, Any]:
        c = self.config
        return {"inputs": len(self.features), "hidden": c.hidden, "layers": c.layers, "classes": len(self.classes),
                "dropout": c.dropout}  # fmt: skip

    def example_input(self) -> torch.Tensor:
        return self.train_x[:1]

    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        return Optimization(optimizer=optimizer)

    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        model.train()
        order = torch.randperm(len(self.train_y), device=self.device)
        total, loss_sum = 0, 0.0
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            loss = nn.functional.cross_entropy(model(self.train_x[rows]), self.train_y[rows])
            context.optimization.optimizer.zero_grad()
            loss.backward()
            context.optimization.optimizer.step()
            total, loss_sum = total + len(rows), loss_sum + loss.item() * len(rows)
        return {TRAIN_LOSS: loss_sum / total}

    def evaluate(self, model: nn.Module, reduce) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            logits = model(self.val_x)
        accuracy = 100 * float((logits.argmax(1) == self.val_y).float().mean())
        return {VAL_LOSS.name: float(nn.functional.cross_entropy(logits, self.val_y)), ACCURACY.name: accuracy}


def mean_row(meta: dict[str, Any]) -> dict[str, Any]:
    """The request a deploy checks: the training split's mean row, and its top 3 (at most)."""
    return {"row": ",".join(f"{v:.6g}" for v in meta["mean"]), "topk": min(3, len(meta["classes"]))}


def val_rows(state: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The reference profile's requests: val.csv's rows (its features, as a client sends them)."""
    table = read_table(Path(state["config"]["data"]) / "val.csv", state["config"]["label"])
    return [{"row": row} for row in table.x[:count].tolist()]


@click.command("tabular-synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rows", type=click.IntRange(10), default=600, show_default=True, help="rows in train.csv")
@click.option("--seed", type=int, default=0, show_default=True)
def synth_command(out: Path, rows: int, seed: int) -> None:
    """Write a learnable table to OUT (train.csv, val.csv): three kinds of parcel by their measures."""
    rng = random.Random(seed)
    centres = {"letter": (30, 22, 3, 0.5), "parcel": (40, 30, 15, 3.0), "crate": (60, 45, 30, 8.0)}
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", rows), ("val", max(rows // 5, 3))):
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["length_cm", "width_cm", "height_cm", "weight_kg", "label"])
            for i in range(count):
                label = list(centres)[i % len(centres)]
                writer.writerow([round(v * rng.uniform(0.4, 1.6), 3) for v in centres[label]] + [label])
    click.echo(f"wrote {out / 'train.csv'} ({rows} rows) and {out / 'val.csv'}")


SPEC = JobSpec(
    kind="tabular",
    description="An MLP classifying the rows of a CSV table (DATA/train.csv, DATA/val.csv).",
    config=TabularConfig,
    run=TabularRun,
    build_model=mlp.build_mlp,
    data_hint="a folder with train.csv and val.csv (a header row, numeric columns and a class column)",
    metrics=(ACCURACY,),
    best=ACCURACY,
    describe_model=lambda params: f"MLP {params.get('layers')}x{params.get('hidden')}",
    serving=Serving(
        name="tabular",
        handler=HERE / "tabular_classifier.py",
        handler_class="TabularClassifier",
        model_file=HERE / "mlp.py",
        inference_keys=("features", "classes", "mean", "std"),
        input="text",
        request_field="row",
        example_request=mean_row,
        # drift: every feature column and the predicted class; quality: the class against the truth
        monitoring=Monitoring(
            reference_requests=val_rows,
            categorical=("class",),
            quality=Quality(registered_metric=ACCURACY.name, registered_scale=0.01),
        ),
    ),  # fmt: skip
    commands=(synth_command,),
)
