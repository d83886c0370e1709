"""Download and verify the official Tiny-ImageNet archive; fail at once when offline."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from torchvision.datasets.utils import check_integrity, download_url

from training.data.errors import DatasetError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


class DownloadError(DatasetError):
    """The archive cannot be fetched or does not verify: the message says where to get it."""


def _manual_steps(dest: Path, url: str) -> str:
    return (
        f"Download {url} by hand on a machine that is online, then unzip it so that "
        f"{dest / 'tiny-imagenet-200' / 'wnids.txt'} exists (or run this command again with --archive ZIP)."
    )


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds when the host cannot be reached, instead of hanging on a long download."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise DownloadError(f"cannot reach {parsed.hostname}:{port} ({e}); this machine looks offline.") from e


def extract_verified(archive: Path, dest: Path, md5: str | None = TINY_IMAGENET_MD5) -> Path:
    """Check the archive's MD5 (when given) and unzip it into `dest`; return the dataset folder."""
    if not archive.is_file():
        raise DownloadError(f"{archive}: archive does not exist")
    if md5 and not check_integrity(str(archive), md5):
        raise DownloadError(f"{archive}: MD5 differs from {md5}; the download is incomplete or corrupt")
    try:
        with zipfile.ZipFile(archive) as zf:
            top = {name.split("/", 1)[0] for name in zf.namelist()}
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a zip archive ({e})") from e
    if len(top) != 1:
        raise DownloadError(f"{archive}: expected one top-level folder, found {sorted(top)}")
    return dest / top.pop()


def download_tinyimagenet(dest: Path, url: str = TINY_IMAGENET_URL, md5: str | None = TINY_IMAGENET_MD5) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        check_reachable(url)
        download_url(url, str(dest), md5=md5)
    except (DownloadError, OSError, RuntimeError) as e:
        raise DownloadError(f"{e}\n{_manual_steps(dest, url)}") from e
    return extract_verified(dest / Path(urlparse(url).path).name, dest, md5)
