"""TorchServe's API keys for one server, and keys that last as long as the server runs.

TorchServe writes three keys to `key_file.json` in its working directory (our state dir):
`inference` and `management`, each with an expiration time (`token_expiration_min` after it was
issued), and `API`, which never expires and is good only for TorchServe's token API
(`GET <management>/token?type=inference|management`). That call issues a new key of the type
and invalidates the old one at once.

Keys that last, two ways (docs/serving.md weighs them):
- the key keeper (`python -m serving.keys keep ...`, started by `dlops serve`) renews each key
  when half its lifetime has passed, until the server's process ends: the key in key_file.json
  is always valid, for clients that read it;
- our clients (`dlops predict`, `generate-http`, `deploy`, `rollback`) re-read key_file.json when
  a key is refused (the keeper may just have rotated it) and renew an expired one themselves with
  the API key, then retry once.

Standard library only: the serving container runs this file as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

KEY_FILE = "key_file.json"
REFUSED = "Token Authorization failed"  # what TorchServe answers to a missing, wrong or expired key
KINDS = ("inference", "management")


class KeyFileError(RuntimeError):
    """A key could not be read or renewed; the message says where the keys are."""


@dataclass(kw_only=True, frozen=True)
class Key:
    value: str
    expires: datetime | None  # None: never (the API key)

    def expires_in(self, now: datetime | None = None) -> float:
        """Seconds until the key expires (negative once it has); infinite for the API key."""
        if self.expires is None:
            return float("inf")
        return (self.expires - (now or datetime.now(UTC))).total_seconds()


def key_file(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_FILE


def _parse_time(text: str) -> datetime:
    # Java's Instant.toString(): 2026-12-01T21:12:24.801167Z (fraction of any length, or none)
    head, _, fraction = text.rstrip("Z").partition(".")
    stamp = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return stamp.replace(microsecond=int((fraction + "000000")[:6])) if fraction else stamp


def read_keys(state_dir: Path) -> dict[str, Key]:
    """{"inference": Key, "management": Key, "API": Key} from key_file.json; {} when auth is off."""
    path = key_file(state_dir)
    if not path.is_file():
        return {}
    for _ in range(5):  # TorchServe rewrites the file in place: a read may catch it half written
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            break
        except (json.JSONDecodeError, OSError):
            time.sleep(0.05)
    else:
        raise KeyFileError(f"{path} cannot be read as JSON")
    keys = {}
    for kind, entry in raw.items():
        expiry = entry.get("expiration time")
        keys[kind] = Key(value=entry["key"], expires=_parse_time(expiry) if expiry else None)
    return keys


def renew(state_dir: Path, management_url: str, kind: str, timeout_s: float = 10.0) -> Key:
    """Ask TorchServe for a new `kind` key (the old one stops working now); return it."""
    if kind not in KINDS:
        raise ValueError(f"key kind {kind!r} is not one of {', '.join(KINDS)}")
    keys = read_keys(state_dir)
    if "API" not in keys:
        raise KeyFileError(f"no API key in {key_file(state_dir)}: is token authorization on for this server?")
    request = urllib.request.Request(f"{management_url.rstrip('/')}/token?type={kind}",
                                     headers={"Authorization": f"Bearer {keys['API'].value}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            pass
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", errors="replace")
        raise KeyFileError(f"TorchServe refused to renew the {kind} key (HTTP {e.code}: {body.strip()})") from e
    fresh = read_keys(state_dir)[kind]
    if fresh.value == keys[kind].value:
        raise KeyFileError(f"TorchServe answered but {key_file(state_dir)} still holds the old {kind} key")
    return fresh


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def keep(state_dir: Path, management_url: str, server_pid: int, poll_s: float = 1.0) -> None:
    """Renew each key once half its lifetime has passed, until process `server_pid` ends."""
    lifetimes: dict[str, float] = {}
    while process_alive(server_pid):
        keys = read_keys(state_dir)
        for kind in KINDS:
            if kind not in keys:
                continue
            left = keys[kind].expires_in()
            # the lifetime is measured from the first sight of a key: the time left then
            lifetime = lifetimes.setdefault(keys[kind].value, max(left, 0.0))
            if left <= lifetime / 2:
                try:
                    fresh = renew(state_dir, management_url, kind)
                    lifetimes[fresh.value] = max(fresh.expires_in(), 0.0)
                    print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} renewed the {kind} key "
                          f"(valid until {fresh.expires:%Y-%m-%dT%H:%M:%SZ})", flush=True)  # fmt: skip
                except (KeyFileError, OSError) as e:  # the server may be stopping; try again next round
                    print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} could not renew the {kind} key: {e}", flush=True)
        time.sleep(poll_s)


def main() -> int:
    parser = argparse.ArgumentParser(description="Keep a TorchServe's keys valid while it runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    keeper = sub.add_parser("keep", help="renew keys at half their lifetime until the server's process ends")
    keeper.add_argument("--state-dir", type=Path, required=True, help="the folder holding key_file.json")
    keeper.add_argument("--management-url", required=True)
    keeper.add_argument("--server-pid", type=int, required=True)
    args = parser.parse_args()
    keep(args.state_dir, args.management_url, args.server_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
