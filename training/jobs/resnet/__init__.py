"""The image-classification job: Tiny-ImageNet -> any torchvision classifier -> Acc@1 / Acc@5.

Defaults follow PyTorch's ImageNet example (`--recipe reference`: its optimizer, schedule and
augmentation); the precision is every job's `--amp auto` (bf16 where the device has it natively, else
fp32; `--amp off` for the example's fp32 exactly); `--recipe fast` swaps in the values measured best
per device class (training/jobs/resnet/recipes.py).
"""

from __future__ import annotations

import dataclasses
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from PIL import Image
from torch import nn

from training.devices import autocast, choose_device, default_print_freq
from training.hardware import device_class
from training.jobs.config import DistributedConfig
from training.jobs.evaluate import EvaluateOptions
from training.jobs.resnet.classifier import ARCHS, STEMS, build_classifier, classifier_from_checkpoint
from training.jobs.resnet.commands import COMMANDS, DATA_COMMANDS
from training.jobs.resnet.data.images import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, eval_transform
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.data.pipeline import JPEG_WORKERS, ImagePipeline, build_pipeline
from training.jobs.resnet.data.synthetic import draw_example
from training.jobs.resnet.doctor import check
from training.jobs.resnet.loop import ClassifierStep, EpochResult, evaluate, train_one_epoch
from training.jobs.resnet.metrics import ACC1, ACC5, DATA_WAIT_SHARE, IMAGES_PER_SECOND, TRAIN_ACC1, TRAIN_ACC5
from training.jobs.resnet.recipes import RECIPES, apply_recipe
from training.jobs.resnet.report import TEMPLATES as REPORT_TEMPLATES
from training.jobs.resnet.report import bench_section, comparisons_section
from training.jobs.resnet.tiny_maps import use_matmul_for_tiny_maps
from training.jobs.resnet.weights import load_pretrained
from training.jobs.run import EpochContext, JobRun, Optimization
from training.jobs.serving import HANDLERS as HANDLERS
from training.jobs.serving import Monitoring, Quality, Request, Serving
from training.jobs.spec import Column, JobSpec, ReportSection, ReportSpec
from training.metrics import EPOCH_SECONDS, TRAIN_LOSS, VAL_LOSS
from training.metrics import Metric as Metric
from training.options import internal, option
from training.runtime import Runtime

HERE = Path(__file__).resolve().parent  # the handler and the model file a served model ships
SCHEDULERS = ("step", "cosine", "one-cycle")
TINY_MAPS = ("auto", "matmul", "conv")


@dataclass(frozen=True, kw_only=True)
class ResNetConfig(DistributedConfig):
    arch: str = option(
        "resnet18", "-a", "--arch", type=click.Choice(ARCHS), show_choices=False,
        help="any torchvision classification model (dlops summary --list)",
    )  # fmt: skip
    stem: str = option(
        "imagenet", type=click.Choice(STEMS),
        help="small: 3x3 stride-1 first conv and no max-pool, the 64x64 adaptation (ResNet families)",
    )  # fmt: skip
    pretrained: bool = option(
        False, is_flag=True, help="start from torchvision's ImageNet weights (a new head for this dataset's classes)"
    )
    image_size: int = option(64, type=click.IntRange(8), help="input resolution (images are resized)")
    batch_size: int = option(256, "-b", "--batch-size", type=click.IntRange(1), help="global batch (all processes)")
    epochs: int = option(20, type=click.IntRange(1), resumable=True)
    lr: float = option(0.1, type=click.FloatRange(0, min_open=True))
    momentum: float = option(0.9, type=click.FloatRange(0, 1))
    nesterov: bool = option(False)
    weight_decay: float = option(1e-4, "--wd", "--weight-decay", type=click.FloatRange(0))
    norm_weight_decay: bool = option(True, help="apply weight decay to BatchNorm weights and biases too")
    scheduler: str = option("step", type=click.Choice(SCHEDULERS))
    lr_step_size: int = option(30, type=click.IntRange(1), help="epochs between lr drops (step scheduler)")
    lr_gamma: float = option(0.1, type=click.FloatRange(0, 1))
    label_smoothing: float = option(0.0, type=click.FloatRange(0, 1, max_open=True))
    augment: str = option(
        "auto", type=click.Choice(AUGMENTATIONS),
        help="auto: flip for Tiny-ImageNet, the ImageNet example's random-resized-crop for other folders",
    )  # fmt: skip
    val_resize: int | None = option(
        None, type=click.IntRange(8),
        help="resize (shorter side) before the evaluation center crop [default: --image-size for Tiny-ImageNet, "
        "--image-size / 0.875 for other folders, as the ImageNet example's 256 for 224]",
    )  # fmt: skip
    channels_last: bool = option(False)
    tiny_maps: str = option(
        "auto", type=click.Choice(TINY_MAPS),
        help="convolutions over feature maps of at most 4 positions (a 64x64 image's last stage): matmul (one "
        "matrix product, 1.4-1.5x faster training on CPUs of both kinds) or conv (the library's kernels); auto: "
        "matmul on a CPU, conv elsewhere",
    )  # fmt: skip
    workers: int | None = option(
        None, "-j", "--workers", type=click.IntRange(0), resumable=True,
        help=f"DataLoader worker processes [default: none when batches come from the decoded cache on a CPU (a "
        f"memory copy each: workers would take cores from the model), else {JPEG_WORKERS}]",
    )  # fmt: skip
    dummy: bool = option(False, is_flag=True, help="synthetic tensors instead of files (throughput checks)")
    data_cache: str = option(
        "auto", help="auto (the matching decoded cache in $DLOPS_CACHE_DIR or data/cache, built once when missing), "
        "off (decode image files every epoch), or a cache folder",
    )  # fmt: skip
    data_on_gpu: str = option(
        "auto", type=click.Choice(["auto", "on", "off"]), help="keep the decoded cache on the GPU, augment there"
    )
    recipe: str = option("reference", type=click.Choice(list(RECIPES)), help="option preset; explicit options win")
    limit_train: int | None = option(None, type=click.IntRange(1), help="use N train images, spread over classes")
    limit_val: int | None = option(None, type=click.IntRange(1), help="use N val images, spread over classes")
    print_freq: int | None = option(
        None, "-p", "--print-freq", type=click.IntRange(0), resumable=True,
        help="batches between lines [default: 10 CPU, 100 GPU]",
    )  # fmt: skip
    experiment: str = option("resnet-tinyimagenet")
    registered_model: str = option("resnet-tinyimagenet")
    recipe_device_class: str | None = internal()  # which column of the recipe table applied


def read_v1(state: dict[str, Any]) -> tuple[dict, float, dict, dict]:
    """A version-1 ResNet checkpoint: its model config from the options, Acc@1 as the best value."""
    config = state["config"]
    model_config = {"arch": config["arch"], "num_classes": len(state["classes"]), "stem": config["stem"],
                    "image_size": state["image_size"]}  # fmt: skip
    return model_config, state["train_state"]["best_acc1"], {}, {}


def data_required(given: dict[str, Any]) -> bool:
    return not given.get("dummy")


def resolve_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's values for this device's class (gpu, cpu-bf16, cpu) between defaults and `given`."""
    choice = choose_device(given.get("device", defaults["device"]))
    klass = device_class(choice.device.type, choice.cpu)
    return apply_recipe(given.get("recipe", defaults["recipe"]), klass, defaults, given)


def describe_model(params: dict[str, str]) -> str:
    return f"{params.get('arch')} ({params.get('stem')} stem, {params.get('image_size', '64')}px)"


class ResNetRun(JobRun):
    """One run of the classifier: images at DATA through the data pipeline, SGD, Acc@1/Acc@5."""

    config: ResNetConfig

    def __init__(self, *, spec: JobSpec, config: ResNetConfig, runtime: Runtime):
        if config.print_freq is None:  # -p: every 100 batches on a GPU, 10 on a CPU, unless given
            config = dataclasses.replace(config, print_freq=default_print_freq(runtime.device))
        if config.tiny_maps == "auto":  # measured on CPUs only (bench/tiny_maps.py); GPUs keep cuDNN's kernels
            config = dataclasses.replace(config, tiny_maps="matmul" if runtime.device.type == "cpu" else "conv")
        super().__init__(spec=spec, config=config, runtime=runtime)

    def build_data(self) -> dict[str, Any]:
        runtime = self.runtime
        # --batch-size is the global batch, as in the ImageNet example: each process takes its share.
        self.per_process_batch = self.config.batch_size // runtime.group.world_size
        if self.per_process_batch < 1:
            raise ValueError(f"--batch-size {self.config.batch_size} is smaller than the {runtime.group.world_size} "
                             "processes")  # fmt: skip
        self.data: ImagePipeline = build_pipeline(self.config, self.per_process_batch, self.device, runtime.group)
        # --augment auto and the evaluation resize, as resolved for this dataset, are the run's options
        self.config = dataclasses.replace(self.config, augment=self.data.augment, val_resize=self.data.resize_size,
                                          workers=self.data.workers)  # fmt: skip
        tags = self.data.tags
        print(f"=> {tags['train_images']} train / {tags['val_images']} val images, {len(self.data.classes)} classes; "
              f"data path: {tags['data_path']}")  # fmt: skip
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        # what serving needs (the spec's inference keys)
        self.classes, self.labels, self.image_size = self.data.classes, self.data.labels, self.config.image_size
        self.resize_size = self.data.resize_size or self.config.image_size
        self.normalization = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        return {**tags, "per_process_batch_size": self.per_process_batch}

    def model_config(self) -> dict[str, Any]:
        c = self.config
        return {"arch": c.arch, "num_classes": len(self.data.classes), "stem": c.stem, "image_size": c.image_size}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.config.tiny_maps == "matmul":
            use_matmul_for_tiny_maps(model)
        return model.to(memory_format=torch.channels_last) if self.config.channels_last else model

    def pretrain(self, model: nn.Module) -> dict[str, Any]:
        if not self.config.pretrained:
            return {}
        return {"pretrained_fresh_tensors": len(load_pretrained(model, self.config.arch))}

    def check_warm_start(self, source: dict[str, Any]) -> None:
        theirs, ours = source["model_config"], self.model_config()
        for key in ("arch", "stem"):
            if theirs[key] != ours[key]:
                raise ValueError(f"--init-from: the checkpoint holds {key} {theirs[key]!r}, this run trains "
                                 f"{ours[key]!r}")  # fmt: skip

    def example_input(self) -> torch.Tensor:
        images = next(iter(self.data.val))[0][:1].to(self.device)
        return self.data.prepare_val(images) if self.data.prepare_val else images

    def steps_per_epoch(self) -> int:
        return len(self.data.train)

    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization:
        """SGD (nesterov optional); no weight decay on BatchNorm parameters when norm_weight_decay is off."""
        c = self.config
        decay = [p for p in model.parameters() if p.ndim > 1 or c.norm_weight_decay]
        no_decay = [p for p in model.parameters() if p.ndim <= 1 and not c.norm_weight_decay]
        groups = [{"params": decay, "weight_decay": c.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        fused = self.device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter
        optimizer = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, fused=fused)
        if c.scheduler == "step":
            step = torch.optim.lr_scheduler.StepLR(optimizer, c.lr_step_size, c.lr_gamma)
            return Optimization(optimizer=optimizer, scheduler=step)
        if c.scheduler == "cosine":
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs)
            return Optimization(optimizer=optimizer, scheduler=cosine)
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=c.lr, epochs=c.epochs, steps_per_epoch=steps_per_epoch
        )
        return Optimization(optimizer=optimizer, scheduler=one_cycle, scheduler_per_batch=True)

    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        o, c = context.optimization, self.config
        # the epoch's sample order is a permutation of (seed, epoch): a resumed epoch skips what it trained
        self.data.set_epoch(context.epoch, skip_batches=context.resume["step"] if context.resume else 0)
        step = ClassifierStep(
            model=model,
            criterion=self.train_criterion,
            optimizer=o.optimizer,
            scaler=context.scaler,
            device=self.device,
            amp=c.amp,
            channels_last=c.channels_last,
            batch_scheduler=o.scheduler if o.scheduler_per_batch else None,
            prepare=self.data.prepare_train,
        )
        train = train_one_epoch(step, self.data.train, epoch=context.epoch, print_freq=c.print_freq,
                                reduce=context.reduce, control=context.control, resume=context.resume)  # fmt: skip
        return {
            TRAIN_LOSS: train.loss,
            TRAIN_ACC1: train.acc1,
            TRAIN_ACC5: train.acc5,
            "train/images": train.images,
            IMAGES_PER_SECOND: train.images_per_second,
            DATA_WAIT_SHARE: train.data_wait_share,
        }

    def evaluate(self, model: nn.Module, reduce) -> dict[str, float]:
        # fp32 whatever the training precision: accuracies compare across devices and precisions
        val: EpochResult = evaluate(model, self.data.val, criterion=nn.CrossEntropyLoss(), device=self.device,
                                    print_freq=self.config.print_freq, channels_last=self.config.channels_last,
                                    reduce=reduce, prepare=self.data.prepare_val)  # fmt: skip
        return {VAL_LOSS.name: val.loss, ACC1.name: val.acc1, ACC5.name: val.acc5}

    def epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        m = metrics
        return (
            f"=> epoch {epoch}/{self.config.epochs}: train loss {m[TRAIN_LOSS]:.4f} Acc@1 {m[TRAIN_ACC1]:.2f} | "
            f"val loss {m[VAL_LOSS.name]:.4f} Acc@1 {m[ACC1.name]:.2f} Acc@5 {m[ACC5.name]:.2f} | "
            f"{m[EPOCH_SECONDS]:.1f} s, {m[IMAGES_PER_SECOND]:.0f} img/s, "
            f"{100 * m[DATA_WAIT_SHARE]:.0f}% waiting for data"
        )

    def run_params(self) -> dict[str, Any]:
        world = self.runtime.group.world_size
        return {
            "world_size": world,
            "global_batch_size": self.per_process_batch * world,
            "per_process_batch_size": self.per_process_batch,
            "lr_scaling": "none (--batch-size is the global batch)",
        }


# --- serving: the adapter between a request and an answer ----------------------------------------------


def example_request(meta: dict[str, Any]) -> dict[str, Any]:
    """A drawn shape as a PNG at the model's resolution, and its top-k (at most 5)."""
    image, _ = draw_example(0, random.Random(0), size=meta["image_size"])
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return {"image": encoded.getvalue(), "topk": min(5, len(meta["classes"]))}


def reference_requests(state: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Validation images spread over the split (every len/count-th), as their files' bytes."""
    data = state["config"].get("data")
    if not data or state["config"].get("dummy"):
        raise ValueError("the run had no DATA folder (--dummy)")
    val = load_image_dataset(data, verify=False).val
    return [{"image": Path(path).read_bytes()} for path, _ in val[:: max(1, len(val) // count)][:count]]


def offline_answer(state: dict[str, Any], request: dict[str, Any], amp: str = "off") -> list[dict[str, Any]]:
    """The top-k of `request["image"]` through the evaluation transform and the checkpoint's model (not the
    handler: a deploy's check then proves the handler too)."""
    model = classifier_from_checkpoint(state)
    with Image.open(io.BytesIO(request["image"])) as image:
        pixels = eval_transform(state["image_size"], state.get("resize_size"))(image.convert("RGB"))
    with torch.no_grad(), autocast(torch.device("cpu"), amp):
        logits = model(pixels[None])
    values, indices = torch.softmax(logits.float(), dim=1)[0].topk(request["topk"])
    return [{"class": state["classes"][c], "label": state["labels"][c], "probability": round(float(p), 6)}
            for p, c in zip(values.tolist(), indices.tolist(), strict=True)]  # fmt: skip


def answer_mismatch(served: Any, offline: Any, amp: str = "off") -> str | None:
    """Same classes in the same order, probabilities within rounding (bf16 within 0.02)."""
    if not isinstance(served, list) or [a.get("class") for a in served] != [a["class"] for a in offline]:
        return f"served classes {served!r}, expected {[a['class'] for a in offline]}"
    tolerance = 1e-3 if amp == "off" else 2e-2
    for got, want in zip(served, offline, strict=True):
        if abs(got["probability"] - want["probability"]) > tolerance:
            return f"{got['class']}: served probability {got['probability']}, expected {want['probability']}"
    return None


def http_request(given: str, fields: dict[str, Any]) -> Request:
    """The image file's bytes as the body; top-k in the X-TopK header."""
    headers = {"X-TopK": str(fields["topk"])} if fields.get("topk") else {}
    return Request(body=Path(given).read_bytes(), content_type="application/octet-stream", headers=headers)


def evaluate_checkpoint(spec: JobSpec, state: dict[str, Any], source: str, data: Path,
                        options: EvaluateOptions) -> None:  # fmt: skip
    from training.jobs.resnet.evaluation import evaluate_checkpoint as evaluate_classifier

    evaluate_classifier(state, source, data, options)


SPEC = JobSpec(
    kind="resnet",
    description="Images at DATA (Tiny-ImageNet's original layout, or any ImageFolder) with any torchvision classifier.",
    config=ResNetConfig,
    run=ResNetRun,
    build_model=build_classifier,
    data_hint="a Tiny-ImageNet folder or an ImageFolder (train/<class>/, val/<class>/), or --dummy",
    metrics=(ACC1, ACC5),
    best=ACC1,  # as the ImageNet example; sweeps optimize it too
    panels={"loss": [TRAIN_LOSS, VAL_LOSS.name], "Acc@1 (%)": [TRAIN_ACC1, ACC1.name]},
    report=ReportSpec(
        columns=(
            Column(label="best val Acc@1", metric=ACC1.name, summary="max"),
            Column(label="best val Acc@5", metric=ACC5.name, summary="max"),
        ),
        throughput=Column(label="throughput", metric=IMAGES_PER_SECOND, summary="mean", digits=0, unit="images/s"),
        quality=ACC1,
        sections=(
            ReportSection(name="bench", collect=bench_section, templates=REPORT_TEMPLATES),
            ReportSection(name="comparisons", collect=comparisons_section, templates=REPORT_TEMPLATES),
        ),
    ),  # fmt: skip
    serving=Serving(
        name="resnet",
        handler=HERE / "image_classifier.py",
        handler_class="ImageClassifier",
        model_file=HERE / "classifier.py",
        inference_keys=("classes", "labels", "image_size", "resize_size", "normalization"),
        input="file",
        example_request=example_request,
        offline_answer=offline_answer,
        answer_mismatch=answer_mismatch,
        http_request=http_request,
        monitoring=Monitoring(
            reference_requests=reference_requests,
            numeric=("width", "height", "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "edges"),
            categorical=("class",),
            embedding="embedding",
            # one column is enough (turned photos move only the edges) at a strict p-value, so that ten tests
            # rarely raise a false alarm; the embedding's classifier well above chance (~0.5 +- 0.05 here)
            p_value=0.001,
            drift_share=0.1,
            embedding_auc=0.65,
            quality=Quality(answer_field="class", name="accuracy", registered_metric=ACC1.name, registered_scale=0.01),
        ),
    ),  # fmt: skip
    commands=tuple(COMMANDS),
    data_commands=tuple(DATA_COMMANDS),
    describe_model=describe_model,
    data_required=data_required,
    resolve_options=resolve_options,
    evaluate=evaluate_checkpoint,
    upgrade_v1=read_v1,
    doctor=check,
    summary_graph=True,
    distributed=True,
)
