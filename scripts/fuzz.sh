#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time: `scripts/fuzz.sh [SECS]`
# (default 30 s each). Targets and their properties: fuzz/fuzz_targets and
# tests/props/mod.rs. A crash leaves its input in fuzz/artifacts/<target>/
# and fails the run.
#
# Toolchain: cargo-fuzz wants nightly for its default AddressSanitizer
# build (`-Zsanitizer=address`). With a nightly toolchain installed (rustup)
# it is used. On a stable-only machine the targets build and run with
# libFuzzer's coverage instrumentation but without ASan (`--sanitizer
# none`): cargo-fuzz 0.13 then passes only stable flags (`-Cpasses=
# sancov-module`, `-Cllvm-args=…`, `--cfg fuzzing`), so no RUSTC_BOOTSTRAP
# is needed. The fuzzed code is safe Rust (no unsafe outside libnbd, which
# the targets do not call), so ASan adds little; panics, overflows (debug
# assertions are on) and property violations are caught either way. Set
# FUZZ_TOOLCHAIN to force one.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECS="${1:-30}"
TARGETS=(range patch_json config merge_dirty)
TARGET_DIR="${FUZZ_TARGET_DIR:-target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

TOOLCHAIN="${FUZZ_TOOLCHAIN:-}"
if [ -z "$TOOLCHAIN" ]; then
    if rustup run nightly rustc --version >/dev/null 2>&1; then
        TOOLCHAIN=nightly
    else
        TOOLCHAIN=stable
    fi
fi
if [ "$TOOLCHAIN" = nightly ]; then
    RUN=(cargo +nightly fuzz run --debug-assertions)
else
    RUN=(cargo "+$TOOLCHAIN" fuzz run --debug-assertions --sanitizer none)
fi
echo "fuzz: toolchain $TOOLCHAIN, ${SECS}s per target"

for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t"
    echo "fuzz: $t"
    "${RUN[@]}" --target-dir "$TARGET_DIR" "$t" "corpus/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 2>&1 |
        grep -E '^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|thread .* panicked|Failing input|artifact_prefix)' || true
    # grep ate the exit status: a crash leaves an artifact.
    if compgen -G "artifacts/$t/crash-*" >/dev/null || compgen -G "artifacts/$t/oom-*" >/dev/null ||
        compgen -G "artifacts/$t/timeout-*" >/dev/null; then
        echo "fuzz: $t FAILED: see fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "fuzz: all targets ran ${SECS}s without a failure"
