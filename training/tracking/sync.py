"""`dlops sync`: deliver what runs' journals still hold (offline runs, outages, killed processes)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from serving.secrets import redact
from training.tracking.journal import Journal, find_journals, names_other_server
from training.tracking.sender import Delivery
from training.tracking.store import check_access, check_reachable, refusals_explained, tracking_uri


def sync_runs(path: Path) -> int:
    """Deliver every pending record of the run at `path` (or of every run under it) to the tracking server
    of this environment (MLFLOW_TRACKING_URI); return how many. A run folder that names another server is
    not sent there, and says so: a folder is data, never an instruction where to send a login."""
    runs = find_journals(path)
    if not runs:
        raise ValueError(f"{path}: no run folder with a tracking journal (RUN_DIR/journal/records.jsonl)")
    uri = tracking_uri()
    check_reachable(uri)
    total, elsewhere = 0, []
    for run_dir in runs:
        journal = Journal(run_dir)
        state = journal.state()
        if journal.pending == 0:
            print(f"=> {run_dir}: nothing pending (run {state.get('run_id')})")
            continue
        if names_other_server(state, uri):
            print(f"=> {run_dir}: not sent: its run {state['run_id']} lives on {redact(state['tracking_uri'])}, and "
                  f"this environment's tracking server is {redact(uri)}. To deliver it there, set MLFLOW_TRACKING_URI "
                  "to that server yourself if you trust it", flush=True)  # fmt: skip
            elsewhere.append(run_dir)
            continue
        with journal.delivery_lock(), tqdm(total=journal.pending, desc=run_dir.name, unit="record") as bar:
            check_access(uri)
            with refusals_explained(uri):  # a refusal keeps the rest pending, for a sync after the fix
                count = Delivery(journal, uri).deliver_pending(lambda done, _: bar.update(done - bar.n))
        journal.close()
        total += count
        print(f"=> {run_dir}: delivered {count} records to run {journal.state().get('run_id')} at {redact(uri)}")
    if elsewhere:
        raise ValueError(f"{len(elsewhere)} run folder(s) name another tracking server and were not sent: "
                         f"{', '.join(str(r) for r in elsewhere)}")  # fmt: skip
    return total
