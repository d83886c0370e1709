"""The download path: verified extraction of an archive made here, and a fast, clear offline failure."""

from __future__ import annotations

import hashlib
import socket
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import cli_error, run_cli
from training.jobs.resnet.data.download import DownloadError, download_tinyimagenet, extract_verified
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet


def _zip_dataset(dataset: Path, archive: Path) -> str:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in dataset.rglob("*"):
            zf.write(path, Path("tiny-imagenet-200") / path.relative_to(dataset))
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_extract_verified_checks_md5_and_yields_a_loadable_dataset(tiny_dataset: Path, tmp_path: Path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    md5 = _zip_dataset(tiny_dataset, archive)
    with pytest.raises(DownloadError, match="MD5 differs"):
        extract_verified(archive, tmp_path / "bad", md5="0" * 32)
    root = extract_verified(archive, tmp_path / "out", md5=md5)
    assert root == tmp_path / "out" / "tiny-imagenet-200"
    assert load_tinyimagenet(root).num_classes == 4


def test_cli_extracts_a_local_archive_and_refuses_a_wrong_one(tiny_dataset: Path, tmp_path: Path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    _zip_dataset(tiny_dataset, archive)
    # the official MD5 cannot match an archive made here
    assert "MD5 differs" in cli_error("data", "download", "tiny-imagenet", "--archive", archive, "--dest", tmp_path)


def test_offline_download_fails_at_once_with_manual_steps(tmp_path: Path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"cannot reach 127\.0\.0\.1.*\n.*by hand.*wnids\.txt"):
        download_tinyimagenet(tmp_path, url=f"http://127.0.0.1:{port}/tiny-imagenet-200.zip")
    assert time.monotonic() - start < 10


def test_synth_command_writes_the_original_layout(tmp_path: Path):
    run_cli("data", "synth", tmp_path / "syn", "--classes", "3", "--train-per-class", "2", "--val-per-class", "1")
    ds = load_tinyimagenet(tmp_path / "syn")
    assert (ds.num_classes, len(ds.train), len(ds.val), ds.val_layout) == (3, 6, 3, "annotations")
