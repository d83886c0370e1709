"""The tabular job: rows of a CSV table -> an MLP -> the class in one column.

    DATA/train.csv, DATA/val.csv    a header row; numeric feature columns and a class column (--label)

Everything dlops needs is declared here: the options (TabularConfig), data and model, one epoch of
training and of validation, the metrics (val accuracy picks the best epoch and is what a sweep
maximizes), how `dlops report` shows a run, and what serving needs (the handler, the model file,
the request `dlops predict` sends and the one `dlops deploy` checks). It registers as the
`tabular` entry point of the `dlops.jobs` group in this package's pyproject.toml.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click
import torch
from torch import nn

from dlops_tabular import mlp
from training import tracking
from training.jobs.base import (
    VAL_LOSS,
    Column,
    EpochContext,
    EvaluateOptions,
    Job,
    Metric,
    Optimization,
    ReportSpec,
    Request,
    RunConfig,
    ServingSpec,
)
from training.options import option
from training.tracking.tags import EVALUATE, JOB_TAG, SOURCE_RUN_TAG

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


class TabularJob(Job):
    """An MLP classifying the rows of a CSV table (DATA/train.csv, DATA/val.csv)."""

    kind, config_class = "tabular", TabularConfig
    data_hint = "a folder with train.csv and val.csv (a header row, numeric columns and a class column)"
    metrics = (ACCURACY,)
    best = ACCURACY
    panels: ClassVar = {"loss": ["train/loss", "val/loss"], "accuracy (%)": ["train/acc", "val/acc"]}
    report = ReportSpec(
        columns=(Column(label="best val accuracy", metric=ACCURACY.name, summary="max"),),
        throughput=Column(label="throughput", metric="time/rows_per_second", summary="mean", digits=0, unit="rows/s"),
        train_loss="train/loss",
        quality=ACCURACY,
    )
    serving = ServingSpec(
        name="tabular", handler=HERE / "tabular_classifier.py", handler_class="TabularClassifier",
        model_file=HERE / "mlp.py", inference_keys=("features", "classes", "mean", "std"), input="text",
    )  # fmt: skip
    config: TabularConfig

    @classmethod
    def commands(cls) -> list[click.Command]:
        return [synth_command]

    # --- data and model ------------------------------------------------------------------------------
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
        print(f"=> {len(train.labels)} train / {len(val.labels)} val rows, {len(self.features)} columns, "
              f"{len(self.classes)} classes")  # fmt: skip
        return {"dataset": str(root.resolve()), "train_rows": len(train.labels), "val_rows": len(val.labels)}

    def _standardized(self, table: Table) -> torch.Tensor:
        return ((table.x - self.mean) / self.std).to(self.device)

    def _targets(self, table: Table) -> torch.Tensor:
        return torch.tensor([self.classes.index(label) for label in table.labels], device=self.device)

    def model_config(self) -> dict[str, Any]:
        c = self.config
        return {"inputs": len(self.features), "hidden": c.hidden, "layers": c.layers, "classes": len(self.classes),
                "dropout": c.dropout}  # fmt: skip

    @staticmethod
    def build_model(model_config: dict[str, Any]) -> nn.Module:
        return mlp.build_mlp(**model_config)

    @staticmethod
    def describe_model(params: dict[str, str]) -> str:
        return f"MLP {params.get('layers')}x{params.get('hidden')}"

    def inference_meta(self) -> dict[str, Any]:
        return {"features": self.features, "classes": self.classes, "mean": self.mean.tolist(),
                "std": self.std.tolist()}  # fmt: skip

    def example_input(self) -> torch.Tensor:
        return self.train_x[:1]

    # --- training ------------------------------------------------------------------------------------
    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        return Optimization(optimizer=optimizer)

    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        model.train()
        order = torch.randperm(len(self.train_y), device=self.device)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            logits = model(self.train_x[rows])
            loss = nn.functional.cross_entropy(logits, self.train_y[rows])
            context.optimization.optimizer.zero_grad()
            loss.backward()
            context.optimization.optimizer.step()
            total, loss_sum = total + len(rows), loss_sum + loss.item() * len(rows)
            correct += int((logits.argmax(1) == self.train_y[rows]).sum())
        return {"train/loss": loss_sum / total, "train/acc": 100 * correct / total}

    def evaluate(self, model: nn.Module, reduce) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            logits = model(self.val_x)
        accuracy = 100 * float((logits.argmax(1) == self.val_y).float().mean())
        return {VAL_LOSS.name: float(nn.functional.cross_entropy(logits, self.val_y)), ACCURACY.name: accuracy}

    def epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        return (f"=> epoch {epoch}/{self.config.epochs}: train loss {metrics['train/loss']:.4f} | val loss "
                f"{metrics['val/loss']:.4f} accuracy {metrics['val/acc']:.2f}%")  # fmt: skip

    # --- serving -------------------------------------------------------------------------------------
    @staticmethod
    def example_request(meta: dict[str, Any]) -> dict[str, Any]:
        """The training split's mean row, as comma-separated text, and its top 3 (at most)."""
        return {"row": ",".join(f"{v:.6g}" for v in meta["mean"]), "topk": min(3, len(meta["classes"]))}

    @staticmethod
    def offline_answer(state: dict[str, Any], request: dict[str, Any], amp: str = "off") -> list[dict[str, Any]]:
        model = mlp.build_mlp(**state["model_config"])
        model.load_state_dict(state["model"])
        row = torch.tensor(mlp.row_values(request["row"], state["features"]))
        x = (row - torch.tensor(state["mean"])) / torch.tensor(state["std"])
        with torch.no_grad():
            probabilities = torch.softmax(model.eval()(x[None]), dim=1)[0]
        values, indices = probabilities.topk(request["topk"])
        return [{"class": state["classes"][c], "probability": round(float(p), 6)}
                for p, c in zip(values.tolist(), indices.tolist(), strict=True)]  # fmt: skip

    @staticmethod
    def answer_mismatch(served: Any, offline: Any, amp: str = "off") -> str | None:
        if not isinstance(served, list) or [a.get("class") for a in served] != [a["class"] for a in offline]:
            return f"served {served!r}, expected {offline!r}"
        worst = max(abs(a["probability"] - b["probability"]) for a, b in zip(served, offline, strict=True))
        return None if worst <= 1e-4 else f"probabilities differ by {worst:.2e}"

    @staticmethod
    def http_request(given: str, fields: dict[str, Any]) -> Request:
        """INPUT is the row: comma-separated values in the columns' order, or a JSON object of them."""
        row: Any = json.loads(given) if given.lstrip().startswith("{") else given
        return Request(body=json.dumps({"row": row, **fields}).encode("utf-8"), content_type="application/json")

    # --- after training ------------------------------------------------------------------------------
    @classmethod
    def evaluate_checkpoint(cls, state: dict[str, Any], source: str, data: Path, options: EvaluateOptions) -> None:
        """Accuracy of a checkpoint on DATA/<split>.csv (val or train), as an MLflow run."""
        table = read_table(Path(data) / f"{options.split}.csv", state["config"]["label"])
        model = mlp.build_mlp(**state["model_config"])
        model.load_state_dict(state["model"])
        x = (table.x - torch.tensor(state["mean"])) / torch.tensor(state["std"])
        with torch.no_grad():
            predicted = model.eval()(x).argmax(1).tolist()
        accuracy = 100 * sum(state["classes"][p] == t for p, t in zip(predicted, table.labels, strict=True))
        accuracy /= len(table.labels)
        print(f"=> {options.split}: accuracy {accuracy:.2f}% on {len(table.labels)} rows")
        tags = {JOB_TAG: EVALUATE, SOURCE_RUN_TAG: str(state.get("run_id"))}
        with tracking.start_run(state.get("experiment") or "tabular", run_name=f"evaluate-{options.split}",
                                tags=tags) as run:  # fmt: skip
            run.log_params({"checkpoint": source, "split": options.split, "rows": len(table.labels)})
            run.log_metrics({"eval/acc": accuracy}, step=0)


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
