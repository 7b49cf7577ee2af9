#!/usr/bin/env bash
# Install what kiwi-restore needs on Debian 12 (run as root, or with sudo available):
# system packages, then a virtualenv in .venv with the project installed editable.
# Idempotent: skips what is already there. Usage: scripts/setup.sh [--test]
#   --test   also install what the test suite needs (pytest, hypothesis, ruff, tools it drives)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PKGS="python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev openssl patch"
[ $WITH_TEST = 1 ] && PKGS="$PKGS rsync attr gettext libarchive-tools unzip zip openssh-server curl"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian packages:$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  python3 -m venv .venv
fi
# pyfuse3 from its PyPI source with scripts/patches/ applied (what each patch does: its
# header, and docs/MOUNT.md). The mount works on stock pyfuse3 too, only slower. Built before
# the project is installed, which then finds pyfuse3 there instead of building it a second
# time. A stamp records which patches the installed build carries.
PYFUSE3=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
pstamp=.venv/.kiwi-pyfuse3
patches=$(cat scripts/patches/pyfuse3-$PYFUSE3-*.patch | sha256sum | cut -c1-16)
if [ "$(cat $pstamp 2>/dev/null)" != "$patches" ] ||
   ! .venv/bin/python -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3, "readdir_end"))' 2>/dev/null; then
  echo "[setup] building pyfuse3 $PYFUSE3 with scripts/patches/" >&2
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$build" "pyfuse3==$PYFUSE3" >&2
  echo "$PYFUSE3_SHA256  $build/pyfuse3-$PYFUSE3.tar.gz" | sha256sum -c --quiet
  tar xzf "$build/pyfuse3-$PYFUSE3.tar.gz" -C "$build"
  for p in scripts/patches/pyfuse3-$PYFUSE3-*.patch; do
    patch -s -d "$build/pyfuse3-$PYFUSE3" -p1 < "$p"
  done
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall \
    "$build/pyfuse3-$PYFUSE3" >&2
  echo "$patches" > $pstamp
fi
# a stamp records what was installed; a test install also covers a plain one. The C tree
# decoder (fuse/_treecols.c) is compiled by this install, so its source is in the stamp too.
stamp=.venv/.kiwi-installed
hash=$(cat setup.cfg pyproject.toml setup.py fuse/_treecols.c | sha256sum | cut -c1-16)
have=$(cat $stamp 2>/dev/null || true)
if [ "$have" != "$hash-1" ] && [ "$have" != "$hash-$WITH_TEST" ]; then
  echo "[setup] installing Python packages into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip >&2
  if [ $WITH_TEST = 1 ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >&2
  else
    .venv/bin/pip install -q --disable-pip-version-check -e . >&2
  fi
  echo "$hash-$WITH_TEST" > $stamp
fi
# the editable install leaves our modules uncompiled; where PYTHONDONTWRITEBYTECODE is set
# (as on these machines) every command would compile them again (~0.1 s of each start)
.venv/bin/python -m compileall -q kiwi_restore exporter fuse >&2
echo "[setup] ready: $(.venv/bin/kiwi-restore --version)" >&2
