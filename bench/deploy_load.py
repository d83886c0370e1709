"""What a deploy costs the users of a server: the same classification load with no deploy, then during
`dlops deploy` in three ways by turns (WAYS: the old way, a synchronous registration; the new way, an
asynchronous one; and asynchronous with the new workers at the lowest priority until checked,
`--yield-cpu`, release/priority.py), and the seconds from the deploy's start to the new version
answering. The deploys run in this process, beside the threads that send the load: the priority
watch's polling of /proc (every 20 ms) shares their interpreter.

Run by hand (not a test), with two classifier versions (model URIs, checkpoints or .mar files):

    .venv/bin/python bench/deploy_load.py SOURCE_A SOURCE_B [--concurrency 8] [--seconds 20] [--deploys 2]

Starts a TorchServe on free 127.0.0.1 ports serving SOURCE_A (token auth on, the archive's own
batching), sends 64x64 JPEG classification requests from --concurrency threads for --seconds
(the baseline), then keeps the same load while deploying SOURCE_B, then SOURCE_A again, and so on
(--deploys each way, by turns). Slow requests of each deploy are listed with the deploy step they
were sent after. Reports requests/s, p50/p99 latency and failed requests (non-200 answers and
refused or reset connections) for the baseline and for each deploy's window, the seconds from the
deploy's start to the first answer of the new version (every answer names its version), and the
deploy's total time (packaging to retiring the old version). Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's code, and tests/ (no installed package) for its load

from release.deploy import deploy, prepare, serve  # noqa: E402
from serving.server import ServeOptions, stop  # noqa: E402
from tests.load import Load  # noqa: E402 - the same load the tests send

# The ways a deploy can start the new version, measured by turns in one run
WAYS = {
    "old way: synchronous registration, same priority": {"register_synchronously": True, "yield_cpu": False},
    "new way: asynchronous registration, same priority": {"register_synchronously": False, "yield_cpu": False},
    "asynchronous, new workers at nice 19 (--yield-cpu)": {"register_synchronously": False, "yield_cpu": True},
}


class PhaseClock(io.TextIOBase):
    """Stdout that also notes when each of the deploy's progress lines ("=> ...") was printed."""

    def __init__(self, out):
        self.out, self.lines = out, []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("=> "):
                self.lines.append((time.time(), line[3:80]))
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def slow_requests(samples: list, start: float, end: float, limit_ms: float, phases: list) -> list[str]:
    """The requests of a window slower than `limit_ms`: when they were sent, relative to the deploy's
    progress lines, to see which step of a deploy the slowest wait behind."""
    slow = sorted((s for s in samples if start <= s[0] < end and 1000 * s[1] > limit_ms), key=lambda s: -s[1])
    notes = []
    for sent, seconds, _, _ in slow[:5]:
        before = [line for at, line in phases if at <= sent]
        notes.append(f"{1000 * seconds:.0f} ms, sent {sent - start:.2f} s into the deploy, after: "
                     f"{before[-1] if before else 'the start'}")  # fmt: skip
    return notes


def window(samples: list, start: float, end: float) -> dict:
    inside = [s for s in samples if start <= s[0] < end]
    ms = sorted(1000 * s[1] for s in inside)
    quantiles = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"requests": len(inside), "failed": sum(s[2] != 200 for s in inside),
            "req_per_s": round(len(inside) / (end - start), 1), "p50_ms": round(quantiles[49], 1),
            "p99_ms": round(quantiles[98], 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs=2, metavar="SOURCE", help="two classifier versions: URI, checkpoint or .mar")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the baseline window")
    parser.add_argument(
        "--deploys",
        type=int,
        default=2,
        help="deploys each way (alternating B, A, B...; the old way and the new way by turns)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        image = tmp_path / "probe.jpg"
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, "JPEG")
        image.write_bytes(buffer.getvalue())
        options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "ts")
        client = serve(options, [args.sources[0]])
        candidates = [prepare(source, options.model_store) for source in args.sources]
        print(f"# {psutil.cpu_count()} CPUs, torch {torch.__version__}; concurrency {args.concurrency}; versions "
              f"{', '.join(c.version for c in candidates)}", flush=True)  # fmt: skip
        rows = []
        try:
            with Load(lambda: client.predict_file("resnet", image), args.concurrency) as load:
                time.sleep(2)  # warm-up: connections, the worker's first batches
                begin = time.time()
                time.sleep(args.seconds)
                rows.append({"phase": "no deploy", **window(load.samples, begin, time.time())})
                clock = PhaseClock(sys.stdout)
                for n in range(len(WAYS) * args.deploys):
                    candidate = candidates[(n + 1) % 2]
                    way, settings = list(WAYS.items())[n % len(WAYS)]
                    start = time.time()
                    with contextlib.redirect_stdout(clock):
                        deploy(client, candidate, **settings)
                    end = time.time()
                    for note in slow_requests(load.samples, start, end, 2 * rows[0]["p99_ms"], clock.lines):
                        print(f"   slow: {note}", flush=True)
                    first = min((s[0] + s[1] for s in load.samples if s[0] >= start and s[3] == candidate.version),
                                default=float("nan"))  # fmt: skip
                    rows.append({"phase": f"deploy {n + 1} to version {candidate.version} ({way})",
                                 **window(load.samples, start, end), "deploy_s": round(end - start, 1),
                                 "to_new_version_s": round(first - start, 1)})  # fmt: skip
                    print(rows[-1], flush=True)
        finally:
            print(stop(options.state_dir), flush=True)
    print("| phase | requests | failed | req/s | p50 ms | p99 ms | deploy s | to new version s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['requests']} | {r['failed']} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r.get('deploy_s', '')} | {r.get('to_new_version_s', '')} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
