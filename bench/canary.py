"""What a canary costs and catches, on a fleet of 2 TorchServe servers behind the gateway (HAProxy).

Run by hand (not a test), with a registered classifier that has at least two versions:

    .venv/bin/python bench/canary.py NAME [--concurrency 8] [--seconds 20] [--interval 5]

1. Serves models:/NAME/1 on a fleet of 2 servers (free 127.0.0.1 ports, token auth on), and sends
   64x64 JPEG classification requests through the gateway from --concurrency threads: --seconds of
   steady load give the baseline p99.
2. Moves the alias `bench-champion` to version 2 and lets the controller (release/controller.py)
   roll it out through the default steps (5, 10, 25, 50 %; --interval s each, --min-requests
   canary requests, 50 by default): the p99 of the requests the stable version answered during the canary, against the
   baseline, and the seconds from the alias move to full promotion.
3. Rolls out a copy of version 2 whose handler fails every 20th request (5%): how many requests the
   bad version answered (and failed) before the abort, as a share of all requests in its window.
Only 127.0.0.1 is contacted; everything runs in a temporary folder, stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's code, and tests/ (no installed package) for its faulty archives

from release.canary import CanaryPolicy, RolloutEnded, rollout  # noqa: E402
from release.controller import follow_once  # noqa: E402
from release.deploy import candidate_from_archive, serve  # noqa: E402
from serving import served  # noqa: E402
from serving.fleet import Fleet, stop_fleet  # noqa: E402
from serving.server import ServeOptions  # noqa: E402
from tests.faults import rewrite_archive  # noqa: E402 - the same fault the tests inject
from tests.load import Load, Sample  # noqa: E402
from training.tracking import store_client  # noqa: E402


def p99_ms(samples: list[Sample]) -> float:
    ordered = sorted(s.seconds for s in samples)
    return 1000 * ordered[max(0, int(0.99 * len(ordered) + 0.5) - 1)] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a registered classifier with versions 1 and 2")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds per canary step")
    parser.add_argument("--min-requests", type=int, default=CanaryPolicy().min_requests,
                        help="canary requests a step needs (the policy's default)")  # fmt: skip
    args = parser.parse_args()
    policy = CanaryPolicy(interval_s=args.interval, min_requests=args.min_requests,
                          max_wait_s=max(60.0, 4 * args.interval))  # fmt: skip
    policy_path = Path(tempfile.mkdtemp()) / "policy.json"
    policy_path.write_text(json.dumps(policy.as_dict()))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, "JPEG")
    with tempfile.TemporaryDirectory() as tmp:
        options = ServeOptions.on_free_ports(model_store=Path(tmp) / "store", state_dir=Path(tmp) / "fleet")
        serve(options, [f"models:/{args.name}/1"], servers=2)
        fleet = Fleet.of(options.state_dir)
        try:
            client, body = fleet.client, buffer.getvalue()
            with Load(lambda: client.predict("resnet", body, "application/octet-stream"), args.concurrency) as load:
                began = time.time()
                time.sleep(args.seconds)
                steady = load.window(began, time.time())

                moved = time.time()
                store_client().set_registered_model_alias(args.name, "bench-champion", "2")
                said = follow_once(fleet, "bench-champion", policy_path)
                promoted = time.time()
                during = [s for s in load.window(moved, promoted) if s.version == "1"]

                serving = options.model_store / served.current(fleet.state_dir, "resnet").mar
                bad = rewrite_archive(serving, Path(tmp) / "resnet-bad.mar", "bad", "errors")
                bad_start = time.time()
                try:
                    rollout(fleet, candidate_from_archive(bad, options.model_store), policy=policy)
                    outcome = "promoted (not caught!)"
                except RolloutEnded as e:
                    outcome = f"{e.outcome}: {e}"
                window = load.window(bad_start, time.time())
        finally:
            stop_fleet(fleet)
    by_bad = [s for s in window if s.version == "bad"]
    failed = [s for s in window if s.status != 200]
    print(f"\n## Canary on a fleet of 2 servers, {args.concurrency} clients, steps {list(policy.steps)} % of "
          f"{args.interval:g} s (min {policy.min_requests} requests)\n")  # fmt: skip
    print("| measure | value |\n|---|---|")
    print(f"| steady: requests/s, p99 | {len(steady) / args.seconds:.1f}, {p99_ms(steady):.1f} ms |")
    print(f"| stable version's p99 during the promoted canary | {p99_ms(during):.1f} ms "
          f"({p99_ms(during) / p99_ms(steady):.2f}x steady, {len(during)} requests) |")  # fmt: skip
    print(f"| alias move to full promotion | {promoted - moved:.1f} s ({'; '.join(said)}) |")
    print(f"| bad version (5% errors): outcome | {outcome.splitlines()[0][:160]} |")
    print(f"| its requests before the abort | {len(by_bad)} of {len(window)} ({len(by_bad) / len(window):.1%}); "
          f"failed: {len(failed)} ({len(failed) / len(window):.2%} of all) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
