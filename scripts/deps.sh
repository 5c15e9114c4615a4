#!/usr/bin/env bash
# Installs the system packages the build, the tests and the demo need, and
# only those that are missing. Debian/Ubuntu (apt) and Fedora/RHEL (dnf/yum).
# Extra package names given as arguments are installed too (`deps.sh wrk`).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "deps: not root and no sudo: install the packages below by hand" >&2
    fi
fi

if command -v apt-get >/dev/null; then
    pkgs=(libnbd-dev libnbd-bin libclang-dev clang qemu-utils pkg-config curl gcc python3 python3-venv python3-dev openssl "$@")
    missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "deps: installing ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
    fi
elif command -v dnf >/dev/null || command -v yum >/dev/null; then
    PM=$(command -v dnf || command -v yum)
    pkgs=(libnbd-devel libnbd clang-devel clang qemu-img pkgconf-pkg-config curl gcc python3 python3-devel openssl "$@")
    missing=()
    for p in "${pkgs[@]}"; do
        rpm -q "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "deps: installing ${missing[*]}"
        $SUDO "$PM" install -y "${missing[@]}"
    fi
else
    echo "deps: unknown package manager; install libnbd (dev), libclang, qemu-img/qemu-nbd, pkg-config, curl" >&2
fi

if ! command -v cargo >/dev/null; then
    echo "deps: cargo not found: install a Rust toolchain (>= 1.80), e.g. from https://rustup.rs" >&2
    exit 1
fi
