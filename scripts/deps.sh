#!/usr/bin/env bash
# Installs the system packages the build, the tests and the demo need, and
# only those that are missing. Debian/Ubuntu (apt) and Fedora/RHEL (dnf/yum).
# Extra package names given as arguments are installed too (`deps.sh wrk`).
# `--clients` adds the real HTTP clients `make test-clients` runs (nbdkit
# with its curl plugin, aria2c, wget), whose package names differ by family.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "deps: not root and no sudo: install the packages below by hand" >&2
    fi
fi

clients=0
extra=()
for a in "$@"; do
    case "$a" in
        --clients) clients=1 ;;
        *) extra+=("$a") ;;
    esac
done

# install_missing NAME...: installs those of NAME not installed yet.
if command -v apt-get >/dev/null; then
    install_missing() {
        local missing=() p
        for p in "$@"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            echo "deps: installing ${missing[*]}"
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
        fi
    }
    pkgs=(libnbd-dev libnbd-bin libclang-dev clang qemu-utils pkg-config curl gcc python3 python3-venv python3-dev openssl)
    # Debian's nbdkit package carries the curl plugin; a release that splits
    # it out names it nbdkit-plugin-curl (installed below if needed).
    client_pkgs=(nbdkit aria2 wget)
    curl_plugin_pkg=nbdkit-plugin-curl
elif command -v dnf >/dev/null || command -v yum >/dev/null; then
    PM=$(command -v dnf || command -v yum)
    install_missing() {
        local missing=() p
        for p in "$@"; do
            # --whatprovides: Fedora's `wget` is provided by wget2-wget.
            rpm -q --whatprovides "$p" >/dev/null 2>&1 || missing+=("$p")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            echo "deps: installing ${missing[*]}"
            $SUDO "$PM" install -y "${missing[@]}"
        fi
    }
    pkgs=(libnbd-devel libnbd clang-devel clang qemu-img pkgconf-pkg-config curl gcc python3 python3-devel openssl)
    # On RHEL and its rebuilds aria2 comes from EPEL.
    client_pkgs=(nbdkit nbdkit-curl-plugin aria2 wget)
    curl_plugin_pkg=nbdkit-curl-plugin
else
    install_missing() {
        echo "deps: unknown package manager; install libnbd (dev), libclang, qemu-img/qemu-nbd, pkg-config, curl${*:+ and: $*}" >&2
    }
    pkgs=()
    client_pkgs=(nbdkit aria2 wget)
    curl_plugin_pkg=""
fi

if [ $clients = 1 ]; then
    pkgs+=("${client_pkgs[@]}")
fi
install_missing "${pkgs[@]}" ${extra[@]+"${extra[@]}"}

if [ $clients = 1 ] && ! nbdkit curl --help >/dev/null 2>&1; then
    if [ -n "$curl_plugin_pkg" ]; then
        install_missing "$curl_plugin_pkg" || true
    fi
    if ! nbdkit curl --help >/dev/null 2>&1; then
        echo "deps: nbdkit has no curl plugin (\`nbdkit curl --help\` fails): install it by hand" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "deps: cargo not found: install a Rust toolchain (>= 1.80), e.g. from https://rustup.rs" >&2
    exit 1
fi
