#!/usr/bin/env bash
# Installs the system packages the build, the tests and the demo need, and
# only those that are missing. Debian/Ubuntu (apt) and Fedora/RHEL (dnf/yum).
# Extra package names given as arguments are installed too (`deps.sh wrk`).
# `--clients` adds the real HTTP clients `make test-clients` runs (nbdkit
# with its curl plugin, aria2c, wget), whose package names differ by family.
# `--build` installs only what building the crate needs (`make lint`): a C
# compiler to link, pkg-config, libnbd's headers (>= 1.14, for libnbd-sys's
# bindgen) and libclang. It checks for each of those, not for packages, so a
# machine that already builds the crate installs nothing.
# Before anything is installed, it checks that rustc is at least Cargo.toml's
# rust-version and stops, saying what to do, when it is older.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "deps: not root and no sudo: install the packages below by hand" >&2
    fi
fi

clients=0
build_only=0
extra=()
for a in "$@"; do
    case "$a" in
        --clients) clients=1 ;;
        --build) build_only=1 ;;
        *) extra+=("$a") ;;
    esac
done

# The Rust toolchain first, before any package is installed: cargo, and a
# rustc at least Cargo.toml's rust-version (the newest rust-version of the
# locked dependencies; an older rustc fails in the middle of the build).
rust_min=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../Cargo.toml" | head -n 1)
if ! command -v cargo >/dev/null; then
    echo "deps: cargo not found: install a Rust toolchain (rustc >= $rust_min), e.g. from https://rustup.rs" >&2
    exit 1
fi
rust_have=$("${RUSTC:-rustc}" --version 2>/dev/null | awk '{print $2}') || rust_have=""
rust_have=${rust_have%%-*}
if [ -z "$rust_have" ] || [ "$(printf '%s\n%s\n' "$rust_min" "$rust_have" | sort -V | head -n 1)" != "$rust_min" ]; then
    if [ -z "$rust_have" ]; then
        echo "deps: \`${RUSTC:-rustc} --version\` failed: this crate needs rustc $rust_min or newer" >&2
    else
        echo "deps: rustc $rust_have is older than $rust_min, the minimum this crate and its locked dependencies need (rust-version in Cargo.toml)" >&2
    fi
    if command -v rustup >/dev/null; then
        echo "deps: run \`rustup update\` (or \`rustup default stable\` if a pinned older toolchain is the default)" >&2
    else
        echo "deps: install Rust $rust_min or newer, e.g. from https://rustup.rs (a distribution's rustc is often older)" >&2
    fi
    exit 1
fi

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
    pkgs=(libnbd-dev libnbd-bin libclang-dev clang qemu-utils pkg-config curl gcc python3 python3-venv python3-dev openssl socat)
    # The --build packages: C compiler, pkg-config, libnbd headers, libclang.
    build_pkgs=(gcc pkg-config libnbd-dev libclang-dev)
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
    pkgs=(libnbd-devel libnbd clang-devel clang qemu-img pkgconf-pkg-config curl gcc python3 python3-devel openssl socat)
    build_pkgs=(gcc pkgconf-pkg-config libnbd-devel clang-devel)
    # On RHEL and its rebuilds aria2 comes from EPEL.
    client_pkgs=(nbdkit nbdkit-curl-plugin aria2 wget)
    curl_plugin_pkg=nbdkit-curl-plugin
else
    install_missing() {
        echo "deps: unknown package manager; install libnbd (dev), libclang, qemu-img/qemu-nbd, pkg-config, curl${*:+ and: $*}" >&2
    }
    pkgs=()
    build_pkgs=(a-C-compiler pkg-config libnbd-dev libclang)
    client_pkgs=(nbdkit aria2 wget)
    curl_plugin_pkg=""
fi

# has_libclang: a libclang bindgen can load (it looks in LIBCLANG_PATH, in
# llvm-config's libdir and in the linker's search path).
has_libclang() {
    local d
    for d in "${LIBCLANG_PATH:-}" "$(llvm-config --libdir 2>/dev/null)" /usr/lib/llvm-*/lib /usr/lib64/llvm*/lib; do
        [ -n "$d" ] && compgen -G "$d/libclang*.so*" >/dev/null && return 0
    done
    ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'
}

if [ $build_only = 1 ]; then
    # build_pkgs[i] provides the i-th of: cc, pkg-config, libnbd >= 1.14, libclang.
    pkgs=()
    command -v cc >/dev/null || pkgs+=("${build_pkgs[0]}")
    command -v pkg-config >/dev/null || pkgs+=("${build_pkgs[1]}")
    pkg-config --atleast-version=1.14 libnbd 2>/dev/null || pkgs+=("${build_pkgs[2]}")
    has_libclang || pkgs+=("${build_pkgs[3]}")
    if [ ${#pkgs[@]} -gt 0 ]; then install_missing "${pkgs[@]}"; fi
else
    if [ $clients = 1 ]; then
        pkgs+=("${client_pkgs[@]}")
    fi
    install_missing "${pkgs[@]}" ${extra[@]+"${extra[@]}"}
fi

if [ $clients = 1 ] && ! nbdkit curl --help >/dev/null 2>&1; then
    if [ -n "$curl_plugin_pkg" ]; then
        install_missing "$curl_plugin_pkg" || true
    fi
    if ! nbdkit curl --help >/dev/null 2>&1; then
        echo "deps: nbdkit has no curl plugin (\`nbdkit curl --help\` fails): install it by hand" >&2
        exit 1
    fi
fi

