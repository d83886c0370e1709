"""`dlops`: Click commands only. Each parses options and calls one plain function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from serving.server import ServeError
from training.checkpoint import CheckpointError, config_for_resume, load_checkpoint
from training.data.download import DownloadError
from training.data.errors import DatasetError
from training.data.images import AUGMENTATIONS
from training.devices import AMP_DTYPES, DeviceError
from training.distributed import launch, under_torchrun
from training.models.resnet import ARCHS, STEMS
from training.models.wordlm import MODEL_TYPES
from training.recipes import RECIPES, apply_recipe
from training.train_lm import RESUMABLE as LM_RESUMABLE
from training.train_lm import LMConfig, train_lm
from training.train_resnet import RESUMABLE, SCHEDULERS, ResNetConfig, train_resnet

USER_ERRORS = (DatasetError, DeviceError, CheckpointError, DownloadError, ServeError, ValueError)


class Group(click.Group):
    """Turn expected failures (bad data, device, checkpoint, server) into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e


def given_options(ctx: click.Context) -> dict[str, Any]:
    """Options the user typed on the command line (not defaults)."""
    return {k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}


def _resumed_options(
    ctx: click.Context, resume: Path, kind: str, changeable: set[str], data: Path | None
) -> dict[str, Any]:
    """The interrupted run's options, with the ones typed now where changing them is safe."""
    given = {k: v for k, v in given_options(ctx).items() if k != "resume"}
    if data:
        given["data"] = str(data)
    return config_for_resume(load_checkpoint(resume, kind=kind)["config"], given, changeable)


def _parse_tags(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs = [v.partition("=") for v in values]
    bad = [v for v, (_, sep, _) in zip(values, pairs, strict=True) if not sep]
    if bad:
        raise click.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}")
    return {key: value for key, _, value in pairs}


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Train, evaluate and serve a ResNet (Tiny-ImageNet) and a word-level LM (WikiText-2), tracked in MLflow."""
    # A console in a non-UTF-8 codec (e.g. gbk) must not crash a run over one printed word.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@main.group(cls=Group)
def train() -> None:
    """Train a model; every run is logged to MLflow."""


R = ResNetConfig  # option defaults live in the config dataclasses, declared once
L = LMConfig


def _options(*options):
    """One decorator applying several click options: a group of options declared once."""

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _run_options(defaults: type):
    """The options every training job shares: where it logs, what it registers, how it resumes."""
    return _options(
        click.option("--experiment", default=defaults.experiment, show_default=True),
        click.option("--run-name", default=None),
        click.option("--registered-model", default=defaults.registered_model, show_default=True),
        click.option(
            "--out-dir", default=defaults.out_dir, show_default=True, help="checkpoints go to OUT_DIR/<run id>/"
        ),
        click.option(
            "--resume",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            default=None,
            help="last.pt of an interrupted run: continue the same MLflow run at the next epoch",
        ),
    )


@train.command("resnet")
@click.argument("data", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("-a", "--arch", type=click.Choice(ARCHS), default=R.arch, show_default=True)
@click.option(
    "--stem",
    type=click.Choice(STEMS),
    default=R.stem,
    show_default=True,
    help="small: 3x3 stride-1 first conv and no max-pool, the usual 64x64 adaptation",
)
@click.option("-b", "--batch-size", type=click.IntRange(1), default=R.batch_size, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=R.epochs, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=R.lr, show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1), default=R.momentum, show_default=True)
@click.option(
    "--wd", "--weight-decay", "weight_decay", type=click.FloatRange(0), default=R.weight_decay, show_default=True
)
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=R.scheduler, show_default=True)
@click.option(
    "--lr-step-size",
    type=click.IntRange(1),
    default=R.lr_step_size,
    show_default=True,
    help="epochs between lr drops (step scheduler)",
)
@click.option("--lr-gamma", type=click.FloatRange(0, 1), default=R.lr_gamma, show_default=True)
@click.option(
    "--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=R.label_smoothing, show_default=True
)
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=R.augment, show_default=True)
@click.option("--amp", type=click.Choice(list(AMP_DTYPES)), default=R.amp, show_default=True)
@click.option("--channels-last/--no-channels-last", default=R.channels_last, show_default=True)
@click.option("--compile/--no-compile", "compile", default=R.compile, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(0), default=R.workers, show_default=True)
@click.option("--seed", type=int, default=R.seed, show_default=True)
@click.option("--device", default=R.device, show_default=True, help="auto, cpu, cuda, cuda:N or mps")
@click.option("--dummy", is_flag=True, help="synthetic tensors instead of files (throughput checks)")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="use N train images, spread over classes")
@click.option("--limit-val", type=click.IntRange(1), default=None, help="use N val images, spread over classes")
@click.option("-p", "--print-freq", type=click.IntRange(0), default=R.print_freq, show_default=True)
@click.option(
    "--early-stop-patience",
    type=click.IntRange(0),
    default=R.early_stop_patience,
    show_default=True,
    help="stop when val loss has not improved for N epochs (0: never)",
)
@_run_options(R)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=R.recipe,
    show_default=True,
    help="option preset (see README); options given explicitly win",
)
@click.option("--nesterov/--no-nesterov", default=R.nesterov, show_default=True)
@click.option(
    "--norm-weight-decay/--no-norm-weight-decay",
    default=R.norm_weight_decay,
    show_default=True,
    help="apply weight decay to BatchNorm weights and biases too",
)
@click.option(
    "--data-cache",
    default=R.data_cache,
    show_default=True,
    help="auto (use a matching decoded cache), off, or a cache folder (built when missing)",
)
@click.option(
    "--data-on-gpu",
    type=click.Choice(["auto", "on", "off"]),
    default=R.data_on_gpu,
    show_default=True,
    help="keep the decoded cache on the GPU and augment there (CUDA only)",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="processes on this machine (DDP through torchrun; one per GPU, or gloo on the CPU)",
)
@click.option(
    "--tag", "tags", multiple=True, callback=_parse_tags, metavar="KEY=VALUE", help="extra MLflow run tag (repeatable)"
)
@click.pass_context
def train_resnet_command(ctx: click.Context, data: Path | None, resume: Path | None, **options: Any) -> None:
    """Train a torchvision ResNet on Tiny-ImageNet at DATA (original layout; see README)."""
    options["data"] = str(data) if data else None
    if resume:
        options = _resumed_options(ctx, resume, "resnet", RESUMABLE, data)
    else:
        if not data and not options["dummy"]:
            raise click.UsageError("give DATA (a Tiny-ImageNet folder), or --dummy for synthetic tensors")
        given = {k: v for k, v in given_options(ctx).items() if k != "data"}  # DATA is set above, as a str
        options = apply_recipe(options["recipe"], options, given)
    config = ResNetConfig(**options)
    if config.nproc_per_node > 1 and not under_torchrun():
        ctx.exit(launch("training.train_resnet", config, config.nproc_per_node, resume))
    train_resnet(config, resume=resume)


@train.command("lm")
@click.argument("data", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", type=click.Choice(MODEL_TYPES), default=L.model, show_default=True)
@click.option("--emsize", type=click.IntRange(1), default=L.emsize, show_default=True, help="word embedding size")
@click.option(
    "--nhid",
    type=click.IntRange(1),
    default=L.nhid,
    show_default=True,
    help="hidden units per layer (feed-forward size for the Transformer)",
)
@click.option("--nlayers", type=click.IntRange(1), default=L.nlayers, show_default=True)
@click.option(
    "--nhead", type=click.IntRange(1), default=L.nhead, show_default=True, help="attention heads (Transformer)"
)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=L.dropout, show_default=True)
@click.option("--tied", is_flag=True, help="tie the word embedding and softmax weights")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=L.lr, show_default=True)
@click.option("--clip", type=click.FloatRange(0), default=L.clip, show_default=True, help="gradient clipping")
@click.option("--epochs", type=click.IntRange(1), default=L.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=L.batch_size, show_default=True)
@click.option("--eval-batch-size", type=click.IntRange(1), default=L.eval_batch_size, show_default=True)
@click.option("--bptt", type=click.IntRange(1), default=L.bptt, show_default=True, help="sequence length")
@click.option("--amp", type=click.Choice(list(AMP_DTYPES)), default=L.amp, show_default=True)
@click.option("--compile/--no-compile", "compile", default=L.compile, show_default=True, help="torch.compile the model")
@click.option("--seed", type=int, default=L.seed, show_default=True)
@click.option("--device", default=L.device, show_default=True, help="auto, cpu, cuda, cuda:N or mps")
@click.option("--log-interval", type=click.IntRange(1), default=L.log_interval, show_default=True)
@click.option("--dry-run", is_flag=True, help="one batch per epoch, to check the pipeline")
@_run_options(L)
@click.pass_context
def train_lm_command(ctx: click.Context, data: Path | None, resume: Path | None, **options: Any) -> None:
    """Train a word-level language model on DATA (train.txt/valid.txt/test.txt or wiki.*.tokens)."""
    options["data"] = str(data) if data else None
    if resume:
        options = _resumed_options(ctx, resume, "lm", LM_RESUMABLE, data)
    elif not data:
        raise click.UsageError("give DATA: a folder with train.txt, valid.txt and test.txt")
    train_lm(LMConfig(**options), resume=resume)


@main.command("generate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--prompt", default="", help="text to continue; words outside the vocabulary become <unk>")
@click.option("--words", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="> 0; higher is more diverse")
@click.option("--seed", type=int, default=1111, show_default=True)
@click.option(
    "--outf", type=click.Path(dir_okay=False, path_type=Path), default=Path("generated.txt"), show_default=True
)
@click.option("--log-interval", type=click.IntRange(0), default=100, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def generate_command(checkpoint: Path, **options: Any) -> None:
    """Generate text from a language-model checkpoint (written as UTF-8)."""
    from training.generate import generate

    if options["temperature"] <= 0:
        raise click.BadParameter(f"must be > 0, got {options['temperature']}", param_hint="--temperature")
    generate(checkpoint, **options)


@main.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("data", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("-b", "--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(0), default=R.workers, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--amp", type=click.Choice(list(AMP_DTYPES)), default="off", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("-p", "--print-freq", type=click.IntRange(0), default=10, show_default=True)
def evaluate_command(checkpoint: Path, data: Path, **options: Any) -> None:
    """Evaluate a ResNet checkpoint on DATA and log the result to MLflow."""
    from training.evaluate import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, data, **options)


@main.command("compare")
@click.argument("checkpoint_a", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("checkpoint_b", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("data", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="compare on N images spread over classes")
@click.option("--grid", type=click.IntRange(1), default=16, show_default=True, help="images in the PNG grid")
@click.option("--show", type=click.IntRange(0), default=20, show_default=True, help="table rows printed")
@click.option("-b", "--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(0), default=R.workers, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"), show_default=True
)
@click.option("--experiment", default="compare", show_default=True)
def compare_command(checkpoint_a: Path, checkpoint_b: Path, data: Path, **options: Any) -> None:
    """List the DATA images two ResNet checkpoints classify differently (CSV, PNG grid, MLflow run)."""
    from training.analysis.compare import compare_checkpoints

    compare_checkpoints(checkpoint_a, checkpoint_b, data, **options)


@main.group(cls=Group)
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
    from training.analysis.bench import bench_devices

    bench_devices(data, train_args=list(train_args), **options)


@main.command("summary")
@click.option("-a", "--arch", type=click.Choice(ARCHS), default="resnet18", show_default=True)
@click.option("--stem", type=click.Choice(STEMS), default="imagenet", show_default=True)
@click.option("--image-size", type=click.IntRange(8), default=64, show_default=True)
@click.option("--num-classes", type=click.IntRange(1), default=200, show_default=True)
@click.option("--depth", type=click.IntRange(1), default=3, show_default=True)
def summary_command(arch: str, stem: str, image_size: int, num_classes: int, depth: int) -> None:
    """Print a ResNet's layer table: layer, input shape, output shape, parameters."""
    import torch

    from training.models.resnet import build_resnet
    from training.models.summary import layer_table

    model = build_resnet(arch, num_classes, stem)
    click.echo(layer_table(model, torch.zeros(1, 3, image_size, image_size), depth=depth))


@main.group(cls=Group)
def data() -> None:
    """Create, download and prepare datasets."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--train-per-class", type=click.IntRange(1), default=100, show_default=True)
@click.option("--val-per-class", type=click.IntRange(1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth_command(out: Path, classes: int, train_per_class: int, val_per_class: int, seed: int) -> None:
    """Write a learnable synthetic dataset in Tiny-ImageNet's exact layout to OUT."""
    from training.data.synthetic import write_synthetic_tinyimagenet

    write_synthetic_tinyimagenet(out, classes, train_per_class, val_per_class, seed=seed, progress=sys.stderr.isatty())
    click.echo(f"wrote {classes} classes x ({train_per_class} train + {val_per_class} val) images to {out}")


@data.command("cache")
@click.argument("data_dir", metavar="DATA", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--splits", default="train,val", show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="default: $DLOPS_CACHE_DIR or data/cache",
)
@click.option("--image-size", type=click.IntRange(8), default=64, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(1), default=None, help="decoding processes (default: all cores)")
def cache_command(data_dir: Path, splits: str, cache_dir: Path | None, image_size: int, workers: int | None) -> None:
    """Decode DATA's images once into memory-mapped uint8 arrays that training reads instead of JPEGs."""
    from training.data.cache import DEFAULT_ROOT, build_cache
    from training.data.tinyimagenet import load_tinyimagenet

    dataset = load_tinyimagenet(data_dir)
    for split in splits.split(","):
        build_cache(dataset, split.strip(), cache_dir or DEFAULT_ROOT, image_size, workers)


@data.command("synth-corpus")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train-lines", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--valid-lines", type=click.IntRange(1), default=200, show_default=True)
@click.option("--test-lines", type=click.IntRange(1), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth_corpus_command(out: Path, train_lines: int, valid_lines: int, test_lines: int, seed: int) -> None:
    """Write a learnable WikiText-like corpus (train.txt, valid.txt, test.txt) to OUT."""
    from training.data.synthetic import write_synthetic_corpus

    write_synthetic_corpus(out, train_lines, valid_lines, test_lines, seed)
    click.echo(f"wrote a corpus of {train_lines}/{valid_lines}/{test_lines} train/valid/test lines to {out}")


@data.command("download")
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
    from training.data.download import TINY_IMAGENET_URL, download_tinyimagenet, extract_verified

    root = extract_verified(archive, dest) if archive else download_tinyimagenet(dest, url or TINY_IMAGENET_URL)
    click.echo(f"{dataset} is ready at {root}")


@main.command("package")
@click.argument("kind", type=click.Choice(["resnet", "lm"]))
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None)
@click.option("--model-uri", default=None, help="models:/NAME/VERSION from the MLflow registry")
@click.option("--run-id", default=None, help="an MLflow run: its checkpoints/best.pt")
@click.option(
    "--model-store", type=click.Path(file_okay=False, path_type=Path), default=Path("model_store"), show_default=True
)
@click.option("--version", default=None, help="model version in TorchServe (default: registry version or epoch)")
def package_command(
    kind: str,
    checkpoint: Path | None,
    model_uri: str | None,
    run_id: str | None,
    model_store: Path,
    version: str | None,
) -> None:
    """Build a TorchServe .mar of a KIND checkpoint into --model-store; log it to the source MLflow run."""
    from serving.package import build_mar

    build_mar(kind, checkpoint, model_uri, run_id, model_store, version)


_client_options = _options(
    click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("logs/torchserve"),
        show_default=True,
        help="where `dlops serve` keeps config.properties, key_file.json and logs",
    ),
    click.option("--inference-port", type=click.IntRange(1, 65535), default=8080, show_default=True),
)


def _show_answer(status: int, answer: Any) -> None:
    """Print a server answer as JSON; fail the command unless it is HTTP 200."""
    import json

    click.echo(json.dumps(answer, indent=1, ensure_ascii=False))
    if status != 200:
        raise click.ClickException(f"HTTP {status}")


@main.command("serve")
@click.option(
    "--model-store", type=click.Path(file_okay=False, path_type=Path), default=Path("model_store"), show_default=True
)
@_client_options
@click.option("--management-port", type=click.IntRange(1, 65535), default=8081, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8082, show_default=True)
@click.option("--grpc-inference-port", type=click.IntRange(1, 65535), default=7070, show_default=True)
@click.option("--grpc-management-port", type=click.IntRange(1, 65535), default=7071, show_default=True)
@click.option("--no-auth", is_flag=True, help="turn token authorization off (local experiments only)")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="workers per model")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="server-side batching")
@click.option("--max-batch-delay", type=click.IntRange(0), default=20, show_default=True, help="milliseconds")
@click.option("--torch-threads", type=click.IntRange(1), default=1, show_default=True, help="torch threads per worker")
def serve_command(no_auth: bool, max_batch_delay: int, **options: Any) -> None:
    """Start TorchServe on 127.0.0.1 with every .mar in --model-store and wait until they are healthy."""
    from serving.server import ServeOptions, start

    start(ServeOptions(auth=not no_auth, max_batch_delay_ms=max_batch_delay, **options))


@main.command("stop")
def stop_command() -> None:
    """Stop the TorchServe started by `dlops serve`."""
    from serving.server import stop

    click.echo(stop())


@main.command("predict")
@click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_client_options
@click.option("--topk", type=click.IntRange(1), default=None, help="number of classes to return (server default 5)")
def predict_command(image: Path, state_dir: Path, inference_port: int, topk: int | None) -> None:
    """Classify IMAGE with the served ResNet (HTTP client)."""
    from serving.client import predict_image

    _show_answer(*predict_image(image, inference_port, state_dir, topk))


@main.command("generate-http")
@_client_options
@click.option("--prompt", default="")
@click.option("--max-words", type=int, default=50, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
def generate_http_command(state_dir: Path, inference_port: int, **request: Any) -> None:
    """Generate text with the served language model (HTTP client)."""
    from serving.client import generate_http

    _show_answer(*generate_http({k: v for k, v in request.items() if v is not None}, inference_port, state_dir))


if __name__ == "__main__":
    main()
