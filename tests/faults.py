"""Faulty versions of a served model, for the checks that must catch them (tests, bench/canary.py,
scripts/docker_check.py): a copy of a .mar under another version whose handler answers every 20th
request with a 500 (errors: 5%), sleeps 0.4 s before each answer (slow), fails to load (load),
answers with the wrong class (answer), or is unchanged (None)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

# serving/handlers/handler_common.py: BaseHandler.handle's end
ANCHOR = "        count_requests(context, answers, self.version, seconds)\n"
SETUP = "    def setup(self) -> None:\n"  # the classifier handler's
# fault -> (the file of the archive it changes, what it finds there, what it puts instead)
FAULTS = {
    "errors": ("handler_common.py", ANCHOR, "        self.served = getattr(self, 'served', 0) + len(answers)\n"
               "        if self.served % 20 < len(answers):\n"
               "            answers[-1] = error_answer(context, len(answers) - 1, RuntimeError('injected fault'))\n"
               + ANCHOR),
    "slow": ("handler_common.py", ANCHOR, "        __import__('time').sleep(0.4)\n" + ANCHOR),
    "load": ("image_classifier.py", SETUP, SETUP + "        raise RuntimeError('broken')\n"),
    "answer": ("image_classifier.py", '"class": classes[c]', '"class": classes[-1 - c]'),
}  # fmt: skip


def rewrite_archive(source: Path, target: Path, version: str, fault: str | None = None) -> Path:
    """`source` as `target` with the manifest's version `version`, registered as no version of the registry,
    and, given a `fault`, the handler changed."""
    changed, find, put = FAULTS[fault] if fault else (None, "", "")
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
            elif item.filename == changed:
                assert find in data.decode(), f"{changed} changed: update tests/faults.py"
                data = data.decode().replace(find, put).encode()
            zout.writestr(item, data)
    return target
