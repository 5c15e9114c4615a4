#!/usr/bin/env bash
# Runs the tests of the NBD wrapper (tests/nbd_connection.rs and
# tests/nbd_queue.rs: the one place with `unsafe` that hands Rust buffers
# to libnbd) under AddressSanitizer, so a buffer freed while libnbd still
# uses it, or a callback on freed state, fails the run.
#
# AddressSanitizer needs nightly (`-Zsanitizer=address`), as `make fuzz`
# does (scripts/fuzz.sh). Without a nightly toolchain (rustup) this prints
# that it is skipped and why, and exits 0. The build goes to its own target
# dir (SANITIZE_TARGET_DIR, default target/sanitize), so it never mixes with
# the normal one.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-gnu
if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "sanitize: SKIPPED: AddressSanitizer is set up here for $TARGET only (this is $(uname -sm))"
    exit 0
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "sanitize: SKIPPED: no nightly toolchain: AddressSanitizer needs -Zsanitizer=address," \
        "which only nightly accepts. Install one with 'rustup toolchain install nightly'."
    exit 0
fi

echo "sanitize: $(cargo +nightly --version), AddressSanitizer, target $TARGET"
# --target keeps RUSTFLAGS off the build scripts and proc macros (which the
# host runs unsanitized).
RUSTFLAGS="-Zsanitizer=address" \
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}" \
    CARGO_TARGET_DIR="${SANITIZE_TARGET_DIR:-target/sanitize}" \
    cargo +nightly test --locked --target "$TARGET" \
    --test nbd_connection --test nbd_queue
