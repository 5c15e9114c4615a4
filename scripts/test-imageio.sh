#!/usr/bin/env bash
# Runs tests/imageio_client.py -- the real ovirt-imageio client library
# against the real server -- in a throw-away virtualenv. ovirt-imageio comes
# as a source package with a small C extension: building it needs gcc and
# the Python headers (python3-dev / python3-devel; scripts/deps.sh installs
# them).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:?usage: test-imageio.sh SERVER_BINARY}
IMAGEIO_VERSION=${IMAGEIO_VERSION:-2.5.1}

VENV=$(mktemp -d "${TMPDIR:-/tmp}/csis-imageio-venv-XXXXXX")
trap 'rm -rf "$VENV"' EXIT

python3 -m venv "$VENV"
start=$(date +%s)
if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "ovirt-imageio==$IMAGEIO_VERSION"; then
    echo "test-imageio: cannot install ovirt-imageio $IMAGEIO_VERSION (it builds a C extension: gcc and the Python headers are needed)" >&2
    exit 1
fi
echo "test-imageio: ovirt-imageio $IMAGEIO_VERSION installed in $(( $(date +%s) - start )) s"
"$VENV/bin/python" tests/imageio_client.py "$BIN"
