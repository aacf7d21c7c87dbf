#!/usr/bin/env bash
# Writes requirements.lock: every package the image installs, pinned, with the SHA-256 of each of its files.
#
# Its inputs are pyproject.toml's runtime dependencies ([project] dependencies; not the dev extra) and its build
# backend ([build-system] requires), which the image's build stage needs to install the project itself with
# --no-build-isolation (so nothing unhashed is downloaded at build time). The resolution is universal (every
# platform marker is kept), for Python 3.11, the image's; the hashes cover every wheel of each pinned version, so
# the same file serves amd64 and arm64 builds.
#
# `make lock` runs this; tests/deploy/test_image.py fails when pyproject.toml asks for something the lock does not
# pin, or pins at a version pyproject does not allow.
#   UV_VERSION   the uv used (installed once into .cache/lock-tools from PyPI)
set -euo pipefail

UV_VERSION="${UV_VERSION:-0.13.9}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="$root/.cache/lock-tools"

if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

cd "$root"
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' |
  "$tools/bin/uv" pip compile pyproject.toml - \
    --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "make lock" --quiet \
    --output-file requirements.lock
echo "requirements.lock written ($(grep -c '^[a-z]' requirements.lock) packages)" >&2
