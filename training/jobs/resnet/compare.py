"""Compare two ResNet checkpoints on the same images: accuracies, agreement, every disagreement.

Each model makes one batched pass over the same deterministic list of (file, label) samples, so
row i of both prediction tensors is the image at samples[i]: file names come from that list,
never from walking folders again.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure  # the object API draws to files with no display or pyplot state

from training import tracking
from training.checkpoint import CheckpointError
from training.devices import choose_device
from training.jobs.resnet.data.dataset import Sample, open_rgb
from training.jobs.resnet.data.images import take_evenly
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.evaluation import check_same_classes, evaluate_samples
from training.jobs.resnet.loop import EpochResult
from training.tracking import registry
from training.tracking.tags import COMPARE, JOB_TAG

CSV_COLUMNS = ["file", "path", "true_class", "true_label", "a_class", "a_label", "a_confidence", "b_class",
               "b_label", "b_confidence"]  # fmt: skip


# What a comparison run holds, named once (the report's comparisons section reads them)
DISAGREEMENTS_CSV = "disagreements.csv"  # one row per image the two models disagree on
SOURCE_A, SOURCE_B = "source_run_a", "source_run_b"  # tags: the two training runs
A_ACC1, A_ACC5, B_ACC1, B_ACC5 = "a/acc1", "a/acc5", "b/acc1", "b/acc5"
AGREEMENT, DISAGREEMENTS = "agreement", "disagreements"


@dataclass(kw_only=True)
class Predictions:
    result: EpochResult
    top1: torch.Tensor  # (N,) class index
    confidence: torch.Tensor  # (N,) softmax probability of top1


@dataclass(kw_only=True)
class Disagreement:
    sample: Sample
    a_class: int
    a_confidence: float
    b_class: int
    b_confidence: float


def predict(state: dict, samples: list[Sample], device: torch.device, batch_size: int, workers: int) -> Predictions:
    """One batched pass of a checkpoint's model over `samples`, in order."""
    top1, confidence = [], []

    def keep(logits: torch.Tensor, _: torch.Tensor) -> None:
        probabilities, classes = torch.softmax(logits, dim=1).max(dim=1)
        top1.append(classes.cpu())
        confidence.append(probabilities.cpu())

    result = evaluate_samples(state, samples, device, batch_size=batch_size, workers=workers, on_batch=keep)
    return Predictions(result=result, top1=torch.cat(top1), confidence=torch.cat(confidence))


def find_disagreements(samples: list[Sample], a: Predictions, b: Predictions) -> list[Disagreement]:
    """Images whose top-1 differs, most confident (higher of the two confidences) first."""
    rows = [
        Disagreement(
            sample=samples[i],
            a_class=int(a.top1[i]),
            a_confidence=float(a.confidence[i]),
            b_class=int(b.top1[i]),
            b_confidence=float(b.confidence[i]),
        )
        for i in torch.nonzero(a.top1 != b.top1).flatten().tolist()
    ]
    return sorted(rows, key=lambda d: (-max(d.a_confidence, d.b_confidence), d.sample[0].name))


def write_csv(rows: list[Disagreement], classes: list[str], labels: list[str], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for d in rows:
            file, label = d.sample
            writer.writerow(
                [
                    file.name, str(file), classes[label], labels[label],
                    classes[d.a_class], labels[d.a_class], f"{d.a_confidence:.4f}",
                    classes[d.b_class], labels[d.b_class], f"{d.b_confidence:.4f}",
                ]
            )  # fmt: skip


def draw_grid(rows: list[Disagreement], labels: list[str], path: Path, columns: int = 4) -> None:
    """The images with captions 'true / A / B' (short labels: the first name of each synset)."""
    short = [label.split(",")[0] for label in labels]
    n = max(len(rows), 1)
    lines = (n + columns - 1) // columns
    figure = Figure(figsize=(3 * columns, 4.0 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, d in zip(axes.flat, rows, strict=False):
        ax.imshow(open_rgb(d.sample[0]))
        ax.set_title(
            f"{d.sample[0].name}\ntrue: {short[d.sample[1]]}\nA: {short[d.a_class]} ({d.a_confidence:.2f})\n"
            f"B: {short[d.b_class]} ({d.b_confidence:.2f})",
            fontsize=8,
        )
    if not rows:
        axes.flat[0].text(0.5, 0.5, "no disagreements", ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def compare_checkpoints(
    checkpoint_a: str | Path,
    checkpoint_b: str | Path,
    data: Path,
    *,
    split: str = "val",
    limit: int | None = None,
    grid: int = 16,
    show: int = 20,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "auto",
    out_dir: Path = Path("runs/compare"),
    experiment: str = COMPARE,  # the experiment is named after the job
) -> list[Disagreement]:
    state_a, named_a = registry.load_source(checkpoint_a, kind="resnet")
    state_b, named_b = registry.load_source(checkpoint_b, kind="resnet")
    if state_a["classes"] != state_b["classes"]:
        raise CheckpointError(
            f"{checkpoint_a} and {checkpoint_b} were trained on different class lists "
            f"({len(state_a['classes'])} vs {len(state_b['classes'])} classes); they cannot be compared"
        )
    ds = load_image_dataset(data)
    check_same_classes(state_a["classes"], ds.classes, checkpoint_a, data)
    samples = take_evenly(ds.split(split), limit)
    choice = choose_device(device)
    print(choice.describe(), flush=True)
    a = predict(state_a, samples, choice.device, batch_size, workers)
    b = predict(state_b, samples, choice.device, batch_size, workers)
    rows = find_disagreements(samples, a, b)
    agreement = 1 - len(rows) / len(samples)
    labels = ds.class_labels

    print(f"A {checkpoint_a}: Acc@1 {a.result.acc1:.3f} Acc@5 {a.result.acc5:.3f}")
    print(f"B {checkpoint_b}: Acc@1 {b.result.acc1:.3f} Acc@5 {b.result.acc5:.3f}")
    print(f"agreement {100 * agreement:.2f}% on {len(samples)} {split} images; {len(rows)} disagreements")
    print_table(rows[:show], ds.classes, labels)
    if len(rows) > show:
        print(f"... {len(rows) - show} more in the CSV")

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / DISAGREEMENTS_CSV, out_dir / "disagreements.png"
    write_csv(rows, ds.classes, labels, csv_path)
    draw_grid(rows[:grid], labels, png_path)
    tags = {JOB_TAG: COMPARE, SOURCE_A: str(state_a.get("run_id")), SOURCE_B: str(state_b.get("run_id"))}
    params = {"checkpoint_a": named_a, "checkpoint_b": named_b, "data": str(Path(data).resolve()), "split": split,
              "limit": limit, "images": len(samples)}  # fmt: skip
    metrics = {A_ACC1: a.result.acc1, A_ACC5: a.result.acc5, B_ACC1: b.result.acc1, B_ACC5: b.result.acc5,
               AGREEMENT: agreement, DISAGREEMENTS: len(rows)}  # fmt: skip
    with tracking.start_run(experiment, run_name=f"compare-{split}", tags=tags) as run:
        run.log_params(params)
        run.log_metrics(metrics, step=0)
        for path in (csv_path, png_path):
            run.log_artifact(path)
        print(f"=> wrote {csv_path} and {png_path}; MLflow run {run.run_id}")
    return rows


def print_table(rows: list[Disagreement], classes: list[str], labels: list[str]) -> None:
    def name(c: int) -> str:
        return f"{classes[c]} {labels[c].split(',')[0][:18]}" if labels[c] != classes[c] else classes[c][:29]

    print(f"{'file':<18} {'true':<29} {'A (confidence)':<37} {'B (confidence)':<37}")
    for d in rows:
        print(f"{d.sample[0].name:<18} {name(d.sample[1]):<29} {name(d.a_class) + f' ({d.a_confidence:.3f})':<37} "
              f"{name(d.b_class) + f' ({d.b_confidence:.3f})':<37}")  # fmt: skip
