"""The image classifier's own commands beside `dlops train resnet`: compare two checkpoints, a
model's layer table, the device benchmark; and its data commands under `dlops data`: a synthetic
dataset, the decoded cache, the Tiny-ImageNet download."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from training.clitools import CHECKPOINT
from training.jobs.resnet.classifier import ARCHS, STEMS, input_size_problem, small_stem_applies
from training.jobs.resnet.data.pipeline import JPEG_WORKERS
from training.tracking.tags import COMPARE


@click.command("compare")
@click.argument("checkpoint_a", type=CHECKPOINT)
@click.argument("checkpoint_b", type=CHECKPOINT)
@click.argument("data", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="compare on N images spread over classes")
@click.option("--grid", type=click.IntRange(1), default=16, show_default=True, help="images in the PNG grid")
@click.option("--show", type=click.IntRange(0), default=20, show_default=True, help="table rows printed")
@click.option("-b", "--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(0), default=JPEG_WORKERS, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"), show_default=True
)
@click.option("--experiment", default=COMPARE, show_default=True)
def compare_command(checkpoint_a: str, checkpoint_b: str, data: Path, **options: Any) -> None:
    """List the DATA images two ResNet checkpoints classify differently (CSV, PNG grid, MLflow run)."""
    from training.jobs.resnet.compare import compare_checkpoints

    compare_checkpoints(checkpoint_a, checkpoint_b, data, **options)


@click.command("summary")
@click.option("-a", "--arch", type=click.Choice(ARCHS), default="resnet18", show_default=True, show_choices=False)
@click.option("--stem", type=click.Choice(STEMS), default="imagenet", show_default=True)
@click.option("--image-size", type=click.IntRange(8), default=64, show_default=True)
@click.option("--num-classes", type=click.IntRange(1), default=200, show_default=True)
@click.option("--depth", type=click.IntRange(1), default=3, show_default=True)
@click.option("--list", "list_archs", is_flag=True, help="list every model -a accepts")
def summary_command(*, arch: str, stem: str, image_size: int, num_classes: int, depth: int, list_archs: bool) -> None:
    """Print a classifier's layer table: layer, input shape, output shape, parameters."""
    if list_archs:
        for name in ARCHS:
            notes = ["--stem small"] if small_stem_applies(name) else []
            notes += [problem] if (problem := input_size_problem(name, image_size)) else []
            click.echo(name + (f"  ({'; '.join(notes)})" if notes else ""))
        return
    import torch

    from training.jobs.resnet.classifier import build_classifier
    from training.models.summary import layer_table

    model = build_classifier(arch, num_classes, stem, image_size)
    click.echo(layer_table(model, torch.zeros(1, 3, image_size, image_size), depth=depth))


@click.group("bench")
def bench() -> None:
    """Benchmarks that log to MLflow."""


@bench.command("devices", context_settings={"ignore_unknown_options": True})
@click.argument("data", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--configs",
    default="cpu,cuda:1,cuda:2",
    show_default=True,
    help="comma-separated: cpu, cpu:N (N gloo processes), cuda:N (N GPUs), mps",
)
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--workers", default="2", show_default=True, help="DataLoader workers; a list (0,2,4) sweeps them")
@click.option("--experiment", default="device-bench", show_default=True)
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def bench_devices_command(data: Path, train_args: tuple[str, ...], **options: Any) -> None:
    """Time the same ResNet training on each device configuration (extra args go to `train resnet`)."""
    from training.jobs.resnet.bench import bench_devices

    bench_devices(data, train_args=list(train_args), **options)


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--train-per-class", type=click.IntRange(1), default=100, show_default=True)
@click.option("--val-per-class", type=click.IntRange(1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth_command(out: Path, classes: int, train_per_class: int, val_per_class: int, seed: int) -> None:
    """Write a learnable synthetic dataset in Tiny-ImageNet's exact layout to OUT."""
    from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet

    write_synthetic_tinyimagenet(
        out,
        num_classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        seed=seed,
        progress=sys.stderr.isatty(),
    )
    click.echo(f"wrote {classes} classes x ({train_per_class} train + {val_per_class} val) images to {out}")


@click.command("cache")
@click.argument("data_dir", metavar="DATA", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--splits", default="train,val", show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="default: $DLOPS_CACHE_DIR or data/cache",
)
@click.option("--image-size", type=click.IntRange(8), default=64, show_default=True)
@click.option("--val-resize", type=click.IntRange(8), default=None,
              help="resize before the center crop [default: as `train resnet --val-resize`]")  # fmt: skip
@click.option("-j", "--workers", type=click.IntRange(1), default=None, help="decoding processes (default: all cores)")
def cache_command(*, data_dir: Path, splits: str, cache_dir: Path | None, image_size: int, val_resize: int | None,
                  workers: int | None) -> None:  # fmt: skip
    """Decode DATA's images once into memory-mapped uint8 arrays that training reads instead of image files."""
    from training.jobs.resnet.data.cache import build_cache
    from training.jobs.resnet.data.images import resolve_resize
    from training.jobs.resnet.data.index import load_image_dataset

    dataset = load_image_dataset(data_dir)
    resize = resolve_resize(val_resize, image_size, dataset.layout)
    for split in splits.split(","):
        build_cache(
            dataset, split=split.strip(), root=cache_dir, image_size=image_size, workers=workers, resize_size=resize
        )


@click.command("download")
@click.argument("dataset", type=click.Choice(["tiny-imagenet"]))
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=Path("data"), show_default=True)
@click.option("--url", default=None, help="mirror of the official archive")
@click.option(
    "--archive",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="an already downloaded tiny-imagenet-200.zip: verify and extract it",
)
def download_command(dataset: str, dest: Path, url: str | None, archive: Path | None) -> None:
    """Download, verify (MD5) and extract DATASET into --dest."""
    from training.jobs.resnet.data.download import TINY_IMAGENET_URL, download_tinyimagenet, extract_verified

    root = extract_verified(archive, dest) if archive else download_tinyimagenet(dest, url or TINY_IMAGENET_URL)
    click.echo(f"{dataset} is ready at {root}")


DATA_COMMANDS: list[click.Command] = [synth_command, cache_command, download_command]
COMMANDS: list[click.Command] = [compare_command, summary_command, bench]
