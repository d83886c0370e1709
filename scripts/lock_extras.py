"""Pin a dependency's extras in a hashed lock: `python scripts/lock_extras.py requirements.lock 'pandas[parquet]'`.

pip's hash-checking mode (--require-hashes) refuses a requirement such as evidently's `pandas[parquet]>=1.3.5`
unless the lock pins `pandas[parquet]` itself, and pip-compile's --strip-extras writes `pandas==V` only. This
appends, for each NAME[EXTRA] given, a copy of NAME's entry (version and hashes) under NAME[EXTRA]: pip
accepts both entries together and installs one package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def pin_extras(lock: Path, wanted: list[str]) -> None:
    text = lock.read_text(encoding="utf-8")
    entries = re.split(r"\n(?=[A-Za-z])", text.rstrip("\n"))
    names = {entry.split("==")[0].lower(): entry for entry in entries if "==" in entry.split("\n")[0]}
    for requirement in wanted:
        base = requirement.split("[")[0].lower()
        if requirement.lower() in names:
            continue
        if base not in names:
            sys.exit(f"{lock}: no entry for {base} to pin {requirement} with")
        entries.append(requirement + names[base][len(base) :])
    lock.write_text("\n".join(entries) + "\n", encoding="utf-8")


if __name__ == "__main__":
    pin_extras(Path(sys.argv[1]), sys.argv[2:])
