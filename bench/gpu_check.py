"""GPU self-check: run every GPU-only code path once and print one table (`make gpu-check`).

    python bench/gpu_check.py --data DIR [--out DIR] [--budget-s 480]

On a machine with a CUDA GPU, within about 8 minutes on one H100/H200-class GPU:
  1. GPU-resident cache throughput: the decoded cache on the GPU, batches indexed and augmented
     there (TensorBatches + BatchTransform) through the project's training loop, imagenet and
     small stem, eager and compiled, batch 256/512/1024; host-device syncs counted under
     torch.cuda.set_sync_debug_mode("warn") and recompiles under torch._dynamo's counters.
  2. `dlops train resnet DATA --recipe fast --compile` on the real slice: seconds to 33% val Acc@1,
     final Acc@1 and time, recompiles seen in the log (TORCH_LOGS=recompiles).
  3. LM tokens/s, Transformer and LSTM, fp32 and the --amp choice (random ids, WikiText-2's vocabulary).
  4. DDP with nccl through torchrun, when 2+ GPUs are visible.
  5. The ResNet served by TorchServe with the handler on the GPU: one request answered.
It writes gpu_check.json to --out. A part that needs what the machine lacks (Java, MLflow, a
second GPU) is reported as skipped with the reason. Without CUDA it stops at once, exit 2.
`--smoke-on-cpu` runs the same code on the CPU at toy sizes (the tests use it to keep this
script working on machines without a GPU); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs with a bare python3 too (the GPU machine may lack the venv)

from serving import environment  # noqa: E402
from training.devices import configure_backend, grad_scaler, synchronize  # noqa: E402
from training.hardware import cpu_facts, gpu_facts, resolve_amp  # noqa: E402
from training.jobs.lm.loop import LMStep, train_lm_epoch  # noqa: E402
from training.jobs.lm.wordlm import build_language_model  # noqa: E402
from training.jobs.resnet.classifier import build_classifier  # noqa: E402
from training.jobs.resnet.data.batches import BatchTransform, TensorBatches  # noqa: E402
from training.jobs.resnet.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from training.jobs.resnet.loop import ClassifierStep, train_one_epoch  # noqa: E402

TARGET_ACC1 = 33.0


@dataclass
class Row:
    check: str
    setting: str
    figure: str = ""
    note: str = ""
    values: dict = field(default_factory=dict)


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class SyncCounter(contextlib.AbstractContextManager):
    """Count the host-device synchronizations CUDA reports under sync debug mode "warn"."""

    def __enter__(self) -> SyncCounter:
        self.count = 0
        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self.count = sum("synchroniz" in str(w.message) for w in self._seen)
        self._catch.__exit__(*exc)


def precision_name(amp: str) -> str:
    return "fp32" if amp == "off" else amp


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def resident_images(
    data: Path | None, size: int, device: torch.device, cache_dir: Path, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """uint8 (N, 3, 64, 64) channels_last images and labels on the device: the real slice's decoded
    cache (its first `limit` images), or random images of Tiny-ImageNet's full size without data."""
    if data is not None:
        from training.jobs.resnet.data.cache import build_cache
        from training.jobs.resnet.data.index import load_image_dataset

        ds = load_image_dataset(data)
        cache = build_cache(ds, split="train", root=cache_dir)
        images = torch.from_numpy(cache.images[:limit].copy()).to(device).permute(0, 3, 1, 2)
        return images, torch.from_numpy(cache.labels[:limit]).to(device), ds.num_classes
    images = torch.randint(0, 256, (size, 64, 64, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    return images, torch.randint(200, (size,), device=device), 200


def throughput(args, device: torch.device, budget: Budget) -> list[Row]:
    limit = args.images if args.smoke_on_cpu else None
    images, labels, classes = resident_images(args.data, args.images, device, args.cache_dir, limit)
    rows = []
    for compiled in (False, True):
        for stem in ("imagenet", "small"):
            for batch in args.batches:
                mode = "compiled" if compiled else "eager"
                setting = f"{stem} stem, batch {batch}, {mode}, {precision_name(args.amp)}, channels_last"
                if budget.left() < 30:
                    rows.append(Row("resident cache throughput", setting, note="skipped: time budget spent"))
                    continue
                torch.manual_seed(0)
                model = build_classifier("resnet18", classes, stem).to(device, memory_format=torch.channels_last)
                # on the CPU smoke run, dynamo alone (no inductor C++ build): the recompile count is the point
                trained = (
                    torch.compile(model, backend="eager" if args.smoke_on_cpu else "inductor") if compiled else model
                )
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
                batches = TensorBatches(
                    lambda i: (images[i], labels[i]), len(labels), batch, shuffle=True, drop_last=True, device=device
                )
                prepare = BatchTransform("flip-crop", IMAGENET_MEAN, IMAGENET_STD, train=True)
                criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
                scaler = grad_scaler(device, args.amp)

                def epoch(n: int, *, trained=trained, optimizer=optimizer, batches=batches, prepare=prepare,
                          criterion=criterion, scaler=scaler):  # fmt: skip
                    batches.set_epoch(n)
                    step = ClassifierStep(
                        model=trained,
                        criterion=criterion,
                        optimizer=optimizer,
                        scaler=scaler,
                        device=device,
                        amp=args.amp,
                        channels_last=True,
                        prepare=prepare,
                    )
                    return train_one_epoch(step, batches, epoch=n, print_freq=0)

                warm_start = time.perf_counter()
                epoch(0)  # warm-up: cuDNN autotuning, compilation
                warm = time.perf_counter() - warm_start
                graphs = unique_graphs()
                with SyncCounter() as syncs:
                    result = epoch(1)
                recompiles = unique_graphs() - graphs
                rows.append(Row(
                    "resident cache throughput", setting, f"{result.images_per_second:,.0f} img/s",
                    f"syncs in epoch: {syncs.count}; recompiles: {recompiles}; warm-up {warm:.1f} s",
                    {"images_per_s": result.images_per_second, "syncs": syncs.count, "recompiles": recompiles,
                     "warmup_s": warm, "stem": stem, "batch": batch, "compiled": compiled},
                ))  # fmt: skip
                print(f"  {setting}: {rows[-1].figure} ({rows[-1].note})", flush=True)
    return rows


def dlops(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}, timeout=timeout)  # fmt: skip


def missing_for_training() -> str | None:
    for module in ("mlflow", "click", "torchinfo"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module} is missing (use the project's venv: make setup)"
    return None


def fast_recipe(args, workdir: Path, budget: Budget) -> tuple[list[Row], Path | None]:
    why = missing_for_training() or (None if args.data else "no --data (the real slice) given")
    if why or budget.left() < 90:
        return [Row("--recipe fast on the real slice", "", note=f"skipped: {why or 'time budget spent'}")], None
    env = {environment.TRACKING_URI: f"sqlite:///{workdir / 'mlflow.db'}", "TORCH_LOGS": "recompiles"}
    epochs = "1" if args.smoke_on_cpu else "40"
    device = "cpu" if args.smoke_on_cpu else "cuda"
    extra = ["--limit-train", "32", "--limit-val", "16", "-b", "16"] if args.smoke_on_cpu else ["--compile"]
    start = time.perf_counter()
    out = dlops("train", "resnet", str(args.data), "--recipe", "fast", "--epochs", epochs, "--device", device,
                "--data-cache", str(args.cache_dir), "--out-dir", str(workdir / "runs"), "-p", "0",
                "--experiment", "gpu-check", "--offline", *extra, env=env, timeout=max(budget.left(), 60))  # fmt: skip
    wall = time.perf_counter() - start
    (args.out / "fast_recipe.log").write_text(out.stdout + out.stderr, encoding="utf-8")
    if out.returncode != 0:
        failed = f"FAILED (exit {out.returncode}); see fast_recipe.log"
        return [Row("--recipe fast on the real slice", "", note=failed)], None
    accs = [float(a) for a in re.findall(r"val loss [\d.]+ Acc@1 ([\d.]+)", out.stdout)]
    seconds = [float(s) for s in re.findall(r"\| ([\d.]+) s, [\d,]+ img/s", out.stdout)]
    elapsed, to_target = 0.0, None
    for acc, epoch_seconds in zip(accs, seconds, strict=False):
        elapsed += epoch_seconds
        if to_target is None and acc >= TARGET_ACC1:
            to_target = elapsed
    recompiles = len(re.findall(r"Recompiling function", out.stdout + out.stderr))
    figure = f"final Acc@1 {accs[-1]:.2f}% after {len(accs)} epochs, {sum(seconds):.1f} s training ({wall:.0f} s wall)"
    reached = f"{TARGET_ACC1:g}% at {to_target:.1f} s" if to_target else f"{TARGET_ACC1:g}% not reached"
    run_dir = next((workdir / "runs").glob("*/best.pt"), None)
    values = {"acc1": accs, "epoch_seconds": seconds, "to_target_s": to_target, "recompiles": recompiles}
    row = Row("--recipe fast on the real slice", f"{epochs} epochs, compiled", figure,
              f"{reached}; recompiles logged: {recompiles}", values)  # fmt: skip
    return [row], run_dir


def lm_tokens(args, device: torch.device, budget: Budget) -> list[Row]:
    rows = []
    vocab, bptt, batch = (200, 10, 4) if args.smoke_on_cpu else (33_278, 35, 64)
    steps = 4 if args.smoke_on_cpu else 100
    width = 32 if args.smoke_on_cpu else 650  # the same code path at a toy size on the CPU
    models = (("Transformer 200/2x200", dict(model="Transformer", emsize=200, nhid=200, nlayers=2, nhead=2)),
              (f"LSTM 2x{width}", dict(model="LSTM", emsize=width, nhid=width, nlayers=2, nhead=2)))  # fmt: skip
    for name, config in models:
        for amp in dict.fromkeys(("off", args.amp)):  # fp32, and the device's --amp auto choice when it differs
            setting = f"{name}, batch {batch}, bptt {bptt}, {precision_name(amp)}"
            if budget.left() < 20:
                rows.append(Row("LM tokens/s", setting, note="skipped: time budget spent"))
                continue
            torch.manual_seed(0)
            model = build_language_model(ntokens=vocab, dropout=0.2, tied=False, **config).to(device)
            data = torch.randint(vocab, (steps * bptt + 1, batch), device=device)
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
            step = LMStep(model=model, optimizer=optimizer, device=device, bptt=bptt, clip=0.25, amp=amp)
            train_lm_epoch(step, data[: 3 * bptt + 1], epoch=0, log_interval=10**9)  # warm-up
            with SyncCounter() as syncs:
                result = train_lm_epoch(step, data, epoch=1, log_interval=10**9)
            rows.append(Row("LM tokens/s", setting, f"{result.tokens_per_second:,.0f} tokens/s",
                            f"syncs in epoch: {syncs.count}", {"tokens_per_s": result.tokens_per_second,
                                                                "syncs": syncs.count}))  # fmt: skip
            print(f"  {setting}: {rows[-1].figure}", flush=True)
    return rows


def ddp(args, workdir: Path, budget: Budget) -> list[Row]:
    gpus = torch.cuda.device_count()
    why = missing_for_training() or (None if args.data else "no --data given")
    if gpus < 2 and not args.smoke_on_cpu:
        why = why or f"{gpus} GPU visible; DDP with nccl needs 2"
    if why or budget.left() < 60:
        return [Row("DDP (nccl)", "", note=f"skipped: {why or 'time budget spent'}")]
    n, epochs = "2", "1" if args.smoke_on_cpu else "2"
    device = "cpu" if args.smoke_on_cpu else "cuda"
    extra = ["--limit-train", "32", "--limit-val", "16", "-b", "16"] if args.smoke_on_cpu else ["-b", "512"]
    env = {environment.TRACKING_URI: f"sqlite:///{workdir / 'mlflow.db'}"}
    out = dlops("train", "resnet", str(args.data), "--recipe", "fast", "--epochs", epochs, "--device", device,
                "--nproc-per-node", n, "--data-cache", str(args.cache_dir), "-p", "0",
                "--out-dir", str(workdir / "ddp"), "--experiment", "gpu-check-ddp", "--offline", *extra, env=env,
                timeout=max(budget.left(), 60))  # fmt: skip
    (args.out / "ddp.log").write_text(out.stdout + out.stderr, encoding="utf-8")
    if out.returncode != 0:
        return [Row("DDP (nccl)", f"{n} processes", note=f"FAILED (exit {out.returncode}); see ddp.log")]
    rates = re.findall(r"([\d,]+) img/s", out.stdout)
    return [Row("DDP (nccl)", f"{n} processes, {epochs} epoch(s)", f"{rates[-1] if rates else '?'} img/s per process",
                "ok")]  # fmt: skip


def served(args, checkpoint: Path | None, workdir: Path, budget: Budget) -> list[Row]:
    why = None
    if shutil.which("java") is None:
        why = "java is not installed (TorchServe needs Java 17)"
    elif importlib.util.find_spec("ts") is None:
        why = "torchserve is not installed (use the project's venv)"
    elif checkpoint is None:
        why = "no checkpoint (the fast-recipe run did not run)"
    if why or budget.left() < 60:
        return [Row("TorchServe on the GPU", "", note=f"skipped: {why or 'time budget spent'}")]
    from release.deploy import serve
    from serving.server import ServeOptions, stop

    options = ServeOptions.on_free_ports(model_store=workdir / "store", state_dir=workdir / "ts")
    client = serve(options, [str(checkpoint)])
    try:
        from training.jobs.resnet.data.index import load_image_dataset

        image = load_image_dataset(args.data).val[0][0]
        begin = time.perf_counter()
        answer = client.predict_file("resnet", image)
        status = answer.status
        ms = 1000 * (time.perf_counter() - begin)
    finally:
        stop(options.state_dir)
    log = "\n".join(p.read_text(errors="replace") for p in (options.state_dir / "logs").glob("model_log*.log"))
    on_gpu = re.search(r"running on (cuda:\d+)", log)
    (args.out / "torchserve_model_log.txt").write_text(log[-20000:], encoding="utf-8")
    ok = status == 200 and bool(on_gpu) or args.smoke_on_cpu
    return [Row("TorchServe on the GPU", "resnet, 1 request", f"HTTP {status} in {ms:.0f} ms",
                f"handler on {on_gpu.group(1) if on_gpu else 'the CPU'}" + ("" if ok else "; PROBLEM"),
                {"status": status, "answer": answer.data})]  # fmt: skip


def format_table(rows: list[Row]) -> str:
    lines = ["| check | setting | figure | note |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.setting} | {r.figure} | {r.note} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="the Tiny-ImageNet slice (original layout)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json and logs")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "data" / "cache", help="decoded-cache folder")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new checks after this long")
    parser.add_argument("--images", type=int, default=100_000, help="random resident images when no --data")
    parser.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "bf16", "fp16"],
        help="auto: what `dlops train --amp auto` picks on the device (fp32 on a CPU without native bf16)",
    )
    parser.add_argument("--smoke-on-cpu", action="store_true", help="run on the CPU at toy sizes (tests only)")
    args = parser.parse_args()
    if not args.smoke_on_cpu and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"gpu-check needs a CUDA GPU: {why} (torch {torch.__version__}). Nothing was run.", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke_on_cpu else torch.device("cuda", 0)
    if args.smoke_on_cpu:
        args.batches, args.images = [8], 16  # two steps a row: the code paths, not figures
    else:
        args.batches = [256, 512, 1024]
    configure_backend(device)
    # The precision training would choose here: bf16 on a GPU with bf16 units or a CPU with native bf16,
    # fp32 on an AVX2-only CPU, where bf16 runs 10-28x slower (the smoke run then stays inside its budget).
    gpu = gpu_facts(0) if device.type == "cuda" else None
    precision = resolve_amp(args.amp, device.type, cpu_facts(), gpu)
    args.amp = precision.amp
    print(precision.describe(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    name = "CPU (smoke run)" if args.smoke_on_cpu else torch.cuda.get_device_name(0)
    print(f"# gpu-check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for title, run in (
            ("resident cache throughput", lambda: throughput(args, device, budget)),
            ("fast recipe", lambda: fast_recipe(args, workdir, budget)),
            ("LM tokens/s", lambda: lm_tokens(args, device, budget)),
            ("DDP", lambda: ddp(args, workdir, budget)),
        ):
            print(f"=> {title}", flush=True)
            try:
                result = run()
            except Exception as e:  # one broken path must not hide the others
                result = [Row(title, "", note=f"FAILED: {type(e).__name__}: {e}")]
            if isinstance(result, tuple):
                result, checkpoint = result
                args.checkpoint = checkpoint
            rows += result
            synchronize(device)
        print("=> TorchServe", flush=True)
        try:
            rows += served(args, getattr(args, "checkpoint", None), workdir, budget)
        except Exception as e:
            rows.append(Row("TorchServe on the GPU", "", note=f"FAILED: {type(e).__name__}: {e}"))
    table = format_table(rows)
    print(table)
    elapsed = args.budget_s - budget.left()
    (args.out / "gpu_check.json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "amp": args.amp,
         "amp_reason": precision.reason, "seconds": round(elapsed, 1),
         "rows": [r.__dict__ for r in rows]}, indent=1, default=str), encoding="utf-8")  # fmt: skip
    print(f"=> {elapsed:.0f} s; figures in {args.out / 'gpu_check.json'}")
    failed = [r for r in rows if "FAILED" in r.note or "PROBLEM" in r.note]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
