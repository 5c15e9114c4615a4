#!/usr/bin/env bash
# Runs tests/clients.py -- real HTTP clients against the real server: the
# ovirt-imageio client library, a 2 x 4-worker ranged copy, nbdkit's curl
# plugin under nbdcopy, aria2c, wget and curl -- with ovirt-imageio in a
# virtualenv of its own, $TARGET_DIR/imageio-venv (kept for the next run and
# for `make bench`'s imageio rows; `make clean` removes it; remade when its
# ovirt-imageio is not IMAGEIO_VERSION). ovirt-imageio comes as a source
# package with a small C extension: building it needs gcc and the Python
# headers (python3-dev / python3-devel). `scripts/deps.sh --clients`
# installs those and the clients.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:?usage: test-clients.sh SERVER_BINARY}
IMAGEIO_VERSION=${IMAGEIO_VERSION:-2.5.1}

for tool in qemu-img qemu-io qemu-nbd nbdcopy nbdkit aria2c wget curl cmp openssl; do
    if ! command -v "$tool" >/dev/null; then
        echo "test-clients: $tool not found (scripts/deps.sh --clients installs it)" >&2
        exit 1
    fi
done
if ! nbdkit curl --help >/dev/null 2>&1; then
    echo "test-clients: nbdkit has no curl plugin (scripts/deps.sh --clients installs it)" >&2
    exit 1
fi

VENV=${CARGO_TARGET_DIR:-target}/imageio-venv
installed=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ovirt-imageio"))' 2>/dev/null || true)
if [ "$installed" != "$IMAGEIO_VERSION" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    start=$(date +%s)
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "ovirt-imageio==$IMAGEIO_VERSION"; then
        rm -rf "$VENV"
        echo "test-clients: cannot install ovirt-imageio $IMAGEIO_VERSION (it builds a C extension: gcc and the Python headers are needed)" >&2
        exit 1
    fi
    echo "test-clients: ovirt-imageio $IMAGEIO_VERSION installed in $VENV in $(( $(date +%s) - start )) s"
else
    echo "test-clients: ovirt-imageio $IMAGEIO_VERSION in $VENV"
fi
"$VENV/bin/python" tests/clients.py "$BIN"
