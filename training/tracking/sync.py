"""`dlops sync`: deliver what runs' journals still hold (offline runs, outages, killed processes)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from training.tracking.journal import Journal, find_journals
from training.tracking.sender import Delivery
from training.tracking.store import check_access, check_reachable, refusals_explained, tracking_uri


def sync_runs(path: Path) -> int:
    """Deliver every pending record of the run at `path` (or of every run under it); return how many."""
    runs = find_journals(path)
    if not runs:
        raise ValueError(f"{path}: no run folder with a tracking journal (RUN_DIR/journal/records.jsonl)")
    uri = tracking_uri()
    check_reachable(uri)
    total = 0
    for run_dir in runs:
        journal = Journal(run_dir)
        state = journal.state()
        target = state.get("tracking_uri") if state.get("run_id") and state.get("tracking_uri") else uri
        if journal.pending == 0:
            print(f"=> {run_dir}: nothing pending (run {state.get('run_id')})")
            continue
        with journal.delivery_lock(), tqdm(total=journal.pending, desc=run_dir.name, unit="record") as bar:
            check_reachable(target)
            check_access(target)
            with refusals_explained(target):  # a refusal keeps the rest pending, for a sync after the fix
                count = Delivery(journal, target).deliver_pending(lambda done, _: bar.update(done - bar.n))
        journal.close()
        total += count
        print(f"=> {run_dir}: delivered {count} records to run {journal.state().get('run_id')} at {target}")
    return total
