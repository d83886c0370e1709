"""The decoded cache under concurrency: runs and sweep workers started together on fresh image data
build it once (one builder under a lock, the others wait and read it); a builder killed mid-build
leaves nothing that passes for a cache, and the next run builds it again."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from training.jobs.resnet.data import cache
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet

TRAIN = ["--epochs", "1", "-b", "32", "-j", "0", "-p", "0", "--device", "cpu", "--limit-train", "64",
         "--limit-val", "32"]  # fmt: skip
BUILT = re.compile(r"^=> (train|val): decoded \d+ images into ", re.MULTILINE)


def start(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A `dlops` process writing to `log`, in a session of its own (killable with its decoding workers)."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "training.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def environment(tmp_path: Path, name: str) -> dict[str, str]:
    """Each process its own MLflow store (as separate users' runs would have); one shared cache folder."""
    store = tmp_path / f"store-{name}"
    store.mkdir()
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
            "DLOPS_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip


def run_process(data: Path, tmp_path: Path, seed: int) -> subprocess.Popen:
    return start("train", "resnet", str(data), *TRAIN, "--seed", str(seed), "--out-dir", str(tmp_path / f"runs{seed}"),
                 env=environment(tmp_path, f"run{seed}"), log=tmp_path / f"run{seed}.log")  # fmt: skip


def caches(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    """Complete cache folders of `split` under root, and anything half-built."""
    folders = list(root.glob(f"*-{split}-*"))
    complete = [f for f in folders if f.is_dir() and cache.is_complete(f)]
    partial = [f for f in folders if ".partial" in f.name]
    return complete, partial


def test_three_runs_and_a_two_process_sweep_started_together_build_the_cache_once(tmp_path):
    # large enough that decoding takes a while on 2 cores: the processes meet while it is being built
    data = write_synthetic_tinyimagenet(tmp_path / "syn", num_classes=10, train_per_class=300, val_per_class=50,
                                        progress=False)  # fmt: skip
    processes = [run_process(data, tmp_path, seed) for seed in range(3)]
    processes.append(start(
        "sweep", "resnet", str(data), "--trials", "2", "--processes", "2", "--param", "lr=choice:0.01,0.02",
        "--sampler", "random", "--pruner", "none", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--", *TRAIN,
        "--out-dir", str(tmp_path / "sweep-runs"), env=environment(tmp_path, "sweep"), log=tmp_path / "sweep.log",
    ))  # fmt: skip
    for process in processes:
        process.wait(timeout=900)
    logs = {log.name: log.read_text() for log in sorted(tmp_path.glob("*.log"))}
    for process, (name, text) in zip(processes, logs.items(), strict=True):
        assert process.returncode == 0, f"{name}:\n{text[-4000:]}"
    builds = [(name, split) for name, text in logs.items() for split in BUILT.findall(text)]
    assert sorted(split for _, split in builds) == ["train", "val"], builds  # one build of each split in all
    for split in ("train", "val"):
        complete, partial = caches(tmp_path / "cache", split)
        assert len(complete) == 1 and partial == [], (complete, partial)


def test_a_builder_killed_mid_build_leaves_the_next_run_to_build_it_again(tmp_path):
    data = write_synthetic_tinyimagenet(tmp_path / "syn", num_classes=10, train_per_class=400, val_per_class=1,
                                        progress=False)  # fmt: skip
    env = environment(tmp_path, "killed")
    builder = start("data", "cache", str(data), "--splits", "train", env=env, log=tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    while not caches(tmp_path / "cache", "train")[1]:  # the builder's own staging folder exists: it is decoding
        assert builder.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.005)
    os.killpg(builder.pid, signal.SIGKILL)
    builder.wait(timeout=30)
    complete, partial = caches(tmp_path / "cache", "train")
    assert complete == [] and partial, "a killed build must leave nothing that passes for a cache"

    again = subprocess.run([sys.executable, "-m", "training.cli", "data", "cache", str(data), "--splits", "train"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert BUILT.findall(again.stdout) == ["train"], again.stdout  # not waiting forever on the dead builder's lock
    complete, partial = caches(tmp_path / "cache", "train")
    assert len(complete) == 1 and partial == [], (complete, partial)  # its leftovers are gone
    assert len(cache.open_cache(complete[0]).labels) == 4000


def test_a_waiting_process_says_who_builds_and_reads_the_finished_cache(tmp_path, capsys):
    data = write_synthetic_tinyimagenet(tmp_path / "syn", num_classes=2, train_per_class=4, val_per_class=1,
                                        progress=False)  # fmt: skip
    dataset = load_image_dataset(data)
    target = cache.cache_dir(tmp_path / "cache", dataset, "train",
                             cache.cache_key(dataset, dataset.split("train"), 64))  # fmt: skip
    target.parent.mkdir(parents=True)
    # another process holds the lock while this one asks for the cache; it builds, then lets go
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data), str(tmp_path / "cache")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    split = cache.build_cache(dataset, split="train", root=tmp_path / "cache", workers=1)
    assert holder.wait(timeout=60) == 0
    out = capsys.readouterr().out
    assert f"process {holder.pid} on " in out and "is building this cache; waiting for it" in out
    assert "was built by another process" in out and not BUILT.search(out)
    assert len(split.labels) == 8


# Takes the build lock, says so, waits a moment, builds the cache under the lock the way build_cache
# does, and exits (releasing the lock).
HOLDER = """
import sys, time
from pathlib import Path
from training.jobs.resnet.data import cache
from training.jobs.resnet.data.index import load_image_dataset
dataset = load_image_dataset(Path(sys.argv[1]))
root = Path(sys.argv[2])
target = cache.cache_dir(root, dataset, "train", cache.cache_key(dataset, dataset.split("train"), 64))
with cache.build_lock(target, split="train"):
    print("locked", flush=True)
    time.sleep(1.5)
    staging = target.with_name(target.name + ".partial-holder")
    cache._decode(dataset.split("train"), staging=staging, image_size=64, resize_size=None, workers=1, split="train")
    cache._write_meta(staging, dataset=dataset, samples=dataset.split("train"), split="train",
                      key=cache.cache_key(dataset, dataset.split("train"), 64), image_size=64, resize_size=None)
    cache.publish(staging, target)
"""


def test_without_file_locks_each_process_builds_a_private_copy_and_the_first_is_kept(tmp_path, monkeypatch,
                                                                                      capsys):  # fmt: skip
    data = write_synthetic_tinyimagenet(tmp_path / "syn", num_classes=2, train_per_class=4, val_per_class=1,
                                        progress=False)  # fmt: skip
    dataset = load_image_dataset(data)

    def no_locks(handle, operation):  # what flock(2) answers on Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    first = cache.build_cache(dataset, split="train", root=tmp_path / "cache", workers=1)
    assert "offers no file locks" in capsys.readouterr().out and len(first.labels) == 8
    # a second builder, unaware of the first, finishes after it: the first cache stays, the copy goes
    staging = first.directory.with_name(first.directory.name + ".partial-late")
    staging.mkdir()
    (staging / cache.META).write_text("{}")
    before = (first.directory / cache.META).read_text()
    cache.publish(staging, first.directory)
    assert not staging.exists() and (first.directory / cache.META).read_text() == before


def test_a_lock_error_other_than_missing_support_is_raised(tmp_path, monkeypatch):
    def broken(handle, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)), cache.build_lock(tmp_path / "x", split="train"):
        pass
