"""Load test of the served models on loopback, next to the same models' in-process throughput.

Run by hand (not a test), after `make demo` (or any `dlops package` of both models):

    .venv/bin/python bench/serve_load.py [--model-store model_store] [--torch-threads 1] [--log-sample 0.1]

Starts TorchServe on free 127.0.0.1 ports (token auth on) with the newest .mar of each model in the
store, served with the settings each archive carries (workers, batching: `dlops package --workers
--batch-size --max-batch-delay`), then for each concurrency (1, 8, 32) sends at most
--requests requests or for at most --seconds seconds, whichever ends first: 64x64 JPEG
classification, then text generation (--words words per request). Reports requests/s, p50/p95/p99
latency and errors; the memory (RSS and PSS) of each TorchServe worker; and, as baselines, the same
handlers run in this process on batches of the archive's batch size with --torch-threads threads (the
served code path without TorchServe's frontend, queue and IPC), so each served figure reads as a
share of what the model code can do. --log-sample 0 and 1 give the prediction log's cost (summaries
of every request, and their writes). Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from PIL import Image

from release.deploy import mars_to_serve
from serving import environment
from serving.server import ServeOptions, mar_identity, start, stop


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load(send, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """Send requests from `concurrency` threads until either bound is reached."""
    deadline = time.monotonic() + max_seconds
    latencies: list[float] = []
    errors = 0
    counter = iter(range(max_requests))

    def worker() -> None:
        nonlocal errors
        for _ in counter:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                ok = send().ok
            except OSError:  # a refused or reset connection
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    elapsed = time.perf_counter() - began
    ms = [1000 * x for x in latencies]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
    }


def mar_contents(mar: Path, workdir: Path) -> Path:
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(workdir / mar.stem)
    return workdir / mar.stem


class Context:
    """What a handler reads from TorchServe's context, for running it in this process."""

    def __init__(self, model_dir: Path):
        self.system_properties = {"model_dir": str(model_dir)}
        self.manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())

    def get_all_request_header(self, idx: int) -> dict:
        return {}

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, idx: int) -> None:
        raise AssertionError(f"the baseline request {idx} failed: {code} {phrase}")


def in_process_handler(model_dir: Path, module: str, cls: str, threads: int):
    """The .mar's own handler, initialized in this process (the served code path minus TorchServe)."""
    os.environ[environment.TORCH_THREADS] = str(threads)
    sys.path.insert(0, str(model_dir))
    try:
        handler = getattr(importlib.import_module(module), cls)()
        handler.initialize(Context(model_dir))
    finally:
        sys.path.remove(str(model_dir))
    return handler


def in_process_rate(handler, batch: list[dict], seconds: float = 5.0) -> float:
    """Requests per second of handler.handle(batch) repeated for `seconds` (after one warm-up call)."""
    context = Context.__new__(Context)
    handler.handle(batch, context)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        handler.handle(batch, context)
        done += len(batch)
    return done / (time.perf_counter() - start)


def worker_memory() -> dict[int, dict[str, float]]:
    """RSS and PSS (shared pages split between the processes sharing them) of each TorchServe worker."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any("model_service_worker" in part for part in (p.info["cmdline"] or [])):
            info = p.memory_full_info()
            found[p.pid] = {"rss_mb": round(info.rss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per level")
    parser.add_argument("--words", type=int, default=50, help="words per generation request")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--log-sample", type=float, default=0.1, help="the prediction log's share (dlops serve's)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        image = tmp_path / "probe.jpg"
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, "JPEG")
        image.write_bytes(buffer.getvalue())
        options = ServeOptions.on_free_ports(model_store=args.model_store, state_dir=tmp_path / "ts",
                                             torch_threads=args.torch_threads,
                                             prediction_sample=args.log_sample)  # fmt: skip
        mars = {mar_identity(m)[0]: m for m in mars_to_serve(args.model_store, options.state_dir)}
        with zipfile.ZipFile(mars["resnet"]) as zf:
            config = zf.read("model-config.yaml").decode()
        batch_size = int(next(line.split(":")[1] for line in config.splitlines() if line.startswith("batchSize")))
        print(f"# {psutil.cpu_count()} CPUs, torch {torch.__version__}; {', '.join(m.name for m in mars.values())}; "
              f"per-model settings {config.strip().replace(chr(10), ', ')}; torch threads {args.torch_threads}; "
              f"prediction log share {args.log_sample}",
              flush=True)  # fmt: skip
        client = start(options, list(mars.values()))
        try:
            results = {"classify": [], "generate": []}
            for c in levels:
                results["classify"].append(
                    load(lambda: client.predict_file("resnet", image), c, args.requests, args.seconds)
                )
                print("classify", results["classify"][-1], flush=True)
            request = {"prompt": "the", "max_words": args.words, "seed": 1}
            for c in levels:
                row = load(lambda: client.predict_fields("lm", request), c, args.requests, args.seconds)
                row["words_per_s"] = round(row["req_per_s"] * args.words, 1)
                results["generate"].append(row)
                print("generate", row, flush=True)
            results["worker_memory"] = worker_memory()
            print("worker memory (MB):", results["worker_memory"], flush=True)
        finally:
            print(stop(options.state_dir), file=sys.stderr)
        # Baselines: the same handlers in this process, same thread count, same batch size.
        resnet_dir = mar_contents(mars["resnet"], tmp_path)
        lm_dir = mar_contents(mars["lm"], tmp_path)
        classify = in_process_handler(resnet_dir, "image_classifier", "ImageClassifier", args.torch_threads)
        generate = in_process_handler(lm_dir, "text_generator", "TextGenerator", args.torch_threads)
        images = [{"body": image.read_bytes()} for _ in range(batch_size)]
        prompts = [{"body": {"prompt": "the", "max_words": args.words, "seed": i}} for i in range(batch_size)]
        base = {
            "torch_threads": args.torch_threads,
            "batch_size": batch_size,
            "classify_req_per_s": round(in_process_rate(classify, images), 1),
            "generate_words_per_s": round(in_process_rate(generate, prompts) * args.words, 1),
            "generate_words_per_s_one_stream": round(in_process_rate(generate, prompts[:1]) * args.words, 1),
        }
        results["in_process"] = base
        print(f"in-process baselines (the handlers themselves, batch {batch_size}, {args.torch_threads} "
              f"torch thread(s)): {base}")  # fmt: skip
        print("| load | classify req/s | share of in-process | p99 ms | generate req/s | words/s | share | p99 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for c, g in zip(results["classify"], results["generate"], strict=True):
            print(f"| concurrency {c['concurrency']} | {c['req_per_s']} | "
                  f"{100 * c['req_per_s'] / base['classify_req_per_s']:.0f}% | {c['p99_ms']} | {g['req_per_s']} | "
                  f"{g['words_per_s']} | {100 * g['words_per_s'] / base['generate_words_per_s']:.0f}% | "
                  f"{g['p99_ms']} |")  # fmt: skip
        print(json.dumps(results))


if __name__ == "__main__":
    main()
