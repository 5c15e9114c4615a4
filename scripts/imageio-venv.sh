#!/usr/bin/env bash
# Makes sure $TARGET_DIR/imageio-venv holds ovirt-imageio IMAGEIO_VERSION
# (default 2.5.1) and prints the venv's python. Used by scripts/test-clients.sh
# and tests/packaging.sh. Kept for the next run and for `make bench`'s imageio
# rows; `make clean` removes it; remade when its ovirt-imageio is another
# version. ovirt-imageio comes as a source package with a small C extension:
# building it needs gcc and the Python headers (python3-dev / python3-devel;
# scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGEIO_VERSION=${IMAGEIO_VERSION:-2.5.1}
VENV=${CARGO_TARGET_DIR:-target}/imageio-venv
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
installed=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ovirt-imageio"))' 2>/dev/null || true)
if [ "$installed" != "$IMAGEIO_VERSION" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    start=$(date +%s)
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "ovirt-imageio==$IMAGEIO_VERSION" >&2; then
        rm -rf "$VENV"
        echo "imageio-venv: cannot install ovirt-imageio $IMAGEIO_VERSION (it builds a C extension: gcc and the Python headers are needed)" >&2
        exit 1
    fi
    echo "imageio-venv: ovirt-imageio $IMAGEIO_VERSION installed in $VENV in $(( $(date +%s) - start )) s" >&2
else
    echo "imageio-venv: ovirt-imageio $IMAGEIO_VERSION in $VENV" >&2
fi
echo "$VENV/bin/python"
