#!/usr/bin/env bash
# Runs tests/clients.py -- real HTTP clients against the real server: the
# ovirt-imageio client library, a 2 x 4-worker ranged copy, nbdkit's curl
# plugin under nbdcopy, aria2c, wget and curl -- with ovirt-imageio in a
# virtualenv of its own (scripts/imageio-venv.sh). `scripts/deps.sh
# --clients` installs the clients and what building ovirt-imageio needs.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:?usage: test-clients.sh SERVER_BINARY}

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

PYTHON=$(scripts/imageio-venv.sh)
"$PYTHON" tests/clients.py "$BIN"
