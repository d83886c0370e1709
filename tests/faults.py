"""Faulty versions of a served model, for the checks that must catch them (tests, bench/canary.py,
scripts/docker_check.py): a copy of a .mar under another version whose handler answers every 20th
request with a 500 (5% errors), or sleeps 0.4 s before each answer (slow), or is unchanged (None)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

INJECTED = {
    "errors": "        self.served = getattr(self, 'served', 0) + len(answers)\n"
    "        if self.served % 20 < len(answers):\n"
    "            answers[-1] = error_answer(context, len(answers) - 1, RuntimeError('injected fault'))\n",
    "slow": "        __import__('time').sleep(0.4)\n",
}
ANCHOR = "        count_requests(context, answers)\n"  # serving/handlers/handler_common.py: BaseHandler.handle's end


def rewrite_archive(source: Path, target: Path, version: str, fault: str | None = None) -> Path:
    """`source` as `target` with the manifest's version `version`, registered as no version of the registry,
    and, given a `fault`, the handler changed."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            elif item.filename == "meta.json":  # a copy is not the registered version it was made from
                meta = json.loads(data)
                meta["registered"] = None
                data = json.dumps(meta).encode()
            elif item.filename == "handler_common.py" and fault:
                assert ANCHOR in data.decode(), "the handler changed: update tests/faults.py"
                data = data.decode().replace(ANCHOR, INJECTED[fault] + ANCHOR).encode()
            zout.writestr(item, data)
    return target
