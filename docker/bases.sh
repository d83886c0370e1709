#!/usr/bin/env bash
# Stand-in base images built from Debian's own packages (`make docker-bases`), for a machine that
# reaches a Debian mirror and a PyPI mirror but no image registry (an air-gapped site; this project's
# development machines): python:3.11.7-slim-bookworm and postgres:16-bookworm cannot be pulled there.
#
#   local/bookworm-python:3.11   Debian bookworm's python3 (3.11) with venv and CA certificates
#   local/postgres:15-bookworm   Debian bookworm's postgresql 15, with an entry point that reads
#                                POSTGRES_USER/PASSWORD/DB as the official image does
#
# Images that exist already are kept. DEBIAN_MIRROR picks the mirror (default deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")"

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_IMAGE=${PYTHON_BASE:-local/bookworm-python:3.11}
POSTGRES_IMAGE=${POSTGRES_BASE:-local/postgres:15-bookworm}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

have() { docker image inspect "$1" >/dev/null 2>&1; }
rootfs() {  # rootfs NAME PACKAGES: a minimal Debian bookworm file system with PACKAGES, imported as NAME
    echo "=> building $1 from Debian packages ($2)"
    mmdebstrap --quiet --variant=minbase --include="$2" bookworm "$work/rootfs.tar" "$MIRROR"
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' "$work/rootfs.tar" "$1" >/dev/null
    rm -f "$work/rootfs.tar"
}

command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install -y mmdebstrap" >&2; exit 1; }
if have "$PYTHON_IMAGE"; then echo "=> $PYTHON_IMAGE exists"; else rootfs "$PYTHON_IMAGE" python3,python3-venv,ca-certificates; fi
if have "$POSTGRES_IMAGE"; then
    echo "=> $POSTGRES_IMAGE exists"
else
    rootfs local/bookworm-postgresql-rootfs postgresql,ca-certificates
    docker build --quiet -t "$POSTGRES_IMAGE" -f Dockerfile.postgres . >/dev/null
    docker rmi local/bookworm-postgresql-rootfs >/dev/null
    echo "=> built $POSTGRES_IMAGE"
fi
