"""Load test of the served models on loopback, next to the same models' in-process throughput.

Run by hand (not a test), after `make demo` (or any `dlops package` of both models):

    .venv/bin/python bench/serve_load.py [--model-store model_store] [--workers 1] [--batch-size 8]

Starts TorchServe on 127.0.0.1 (token auth on), then for each concurrency (1, 8, 32) sends at most
--requests requests or for at most --seconds seconds, whichever ends first: 64x64 JPEG
classification, then text generation (--words words per request). Reports requests/s, p50/p95/p99
latency and errors; the in-process batched throughput of the same weights on this CPU; and the
resident memory of each TorchServe worker. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import io
import json
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

from serving.client import generate_http, predict_image
from serving.server import ServeOptions, start, stop
from training.models.resnet import build_resnet
from training.models.wordlm import generate_text, lm_from_checkpoint


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
            status, _ = send()
            latencies.append(time.perf_counter() - start)
            errors += status != 200

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


def in_process_images_per_second(resnet_dir: Path, batch: int = 32, seconds: float = 5.0) -> float:
    meta = json.loads((resnet_dir / "meta.json").read_text())
    model = build_resnet(meta["arch"], len(meta["classes"]), meta["stem"]).eval()
    model.load_state_dict(torch.load(resnet_dir / "weights.pt", weights_only=True))
    x = torch.randn(batch, 3, meta["image_size"], meta["image_size"])
    done, start = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            torch.softmax(model(x), 1)
            done += batch
    return done / (time.perf_counter() - start)


def in_process_words_per_second(lm_dir: Path, words: int) -> float:
    meta = json.loads((lm_dir / "meta.json").read_text())
    vocab = json.loads((lm_dir / "vocab.json").read_text())
    weights = torch.load(lm_dir / "weights.pt", weights_only=True)
    model = lm_from_checkpoint({"model_config": meta["model_config"], "model": weights})
    start = time.perf_counter()
    for seed in range(5):
        generate_text(model, vocab, "the", words, 1.0, seed, meta["window"])
    return 5 * words / (time.perf_counter() - start)


def worker_memory_mb() -> dict[int, float]:
    return {
        p.pid: round(p.memory_info().rss / 2**20, 1)
        for p in psutil.process_iter(["cmdline"])
        if any("model_service_worker" in part for part in (p.info["cmdline"] or []))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per level")
    parser.add_argument("--words", type=int, default=50, help="words per generation request")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        image = tmp_path / "probe.jpg"
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, "JPEG")
        image.write_bytes(buffer.getvalue())
        options = ServeOptions(
            model_store=args.model_store, state_dir=tmp_path / "ts", inference_port=args.port,
            management_port=args.port + 1, metrics_port=args.port + 2, workers=args.workers,
            batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, torch_threads=args.torch_threads,
        )  # fmt: skip
        settings = {k: v for k, v in vars(args).items() if k in ("workers", "batch_size", "max_batch_delay",
                                                                  "torch_threads")}  # fmt: skip
        print(f"# {psutil.cpu_count()} CPUs, torch {torch.__version__}; TorchServe settings {settings}", flush=True)
        start(options)
        try:
            results = {"classify": [], "generate": []}
            for c in levels:
                results["classify"].append(
                    load(
                        lambda: predict_image(image, options.inference_port, options.state_dir),
                        c,
                        args.requests,
                        args.seconds,
                    )  # fmt: skip
                )
                print("classify", results["classify"][-1], flush=True)
            request = {"prompt": "the", "max_words": args.words, "seed": 1}
            for c in levels:
                row = load(lambda: generate_http(request, options.inference_port, options.state_dir), c,
                           args.requests, args.seconds)  # fmt: skip
                row["words_per_s"] = round(row["req_per_s"] * args.words, 1)
                results["generate"].append(row)
                print("generate", row, flush=True)
            results["worker_rss_mb"] = worker_memory_mb()
            print("worker RSS (MB):", results["worker_rss_mb"], flush=True)
        finally:
            print(stop(), file=sys.stderr)
        torch.set_num_threads(args.torch_threads)
        resnet_dir = mar_contents(args.model_store / "resnet.mar", tmp_path)
        lm_dir = mar_contents(args.model_store / "lm.mar", tmp_path)
        results["in_process"] = {
            "torch_threads": args.torch_threads,
            "images_per_s_batch32": round(in_process_images_per_second(resnet_dir), 1),
            "words_per_s": round(in_process_words_per_second(lm_dir, args.words), 1),
        }
        print("in-process (same weights, same thread count):", results["in_process"])
        print(json.dumps(results))


if __name__ == "__main__":
    main()
