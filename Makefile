# cloudstack-image-server: the two commands a new user needs are `make run`
# and `make test`; both install missing system packages first.

CARGO ?= cargo
BIN := $(or $(CARGO_TARGET_DIR),target)/release/cloudstack-image-server
DEMO_DIR ?= /tmp/cloudstack-image-server-demo
PORT ?= 54322

.PHONY: all deps build run demo test test-no-direct test-clients fuzz sanitize soak lint fmt clean package package-tools test-package bench load

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --release --locked

# Build, then start the server in the foreground with a ready `demo`
# transfer (a qcow2 with a dirty bitmap behind qemu-nbd). Ctrl-C stops both.
run: build
	scripts/demo.sh $(BIN) $(DEMO_DIR) $(PORT)

# Every test: unit tests and the integration tests, which start real
# qemu-nbd exports and the real server binary.
test: deps
	$(CARGO) build --locked --all-targets
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --workspace --no-fail-fast; \
	else \
		$(CARGO) test --locked --workspace --no-fail-fast; \
	fi

# The same tests against servers started with `--direct-io off`
# (CSIS_TEST_DIRECT_IO=off, read by tests/common/server.rs): every body
# through actix-http's own buffers, the fall-back an operator can switch to.
test-no-direct: deps
	$(CARGO) build --locked --all-targets
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		CSIS_TEST_DIRECT_IO=off $(CARGO) nextest run --locked --workspace --no-fail-fast; \
	else \
		CSIS_TEST_DIRECT_IO=off $(CARGO) test --locked --workspace --no-fail-fast; \
	fi

# Every fuzz target for FUZZ_SECS seconds each (cargo-fuzz, libFuzzer).
FUZZ_SECS ?= 30
fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECS)

# The NBD wrapper's tests (tests/nbd_connection.rs, tests/nbd_queue.rs)
# under AddressSanitizer; needs a nightly toolchain, else says it is skipped.
sanitize: deps
	scripts/sanitize.sh

# 32 clients against 4 transfers for SOAK_SECS seconds, checked against a
# model of every image, RSS/fd/NBD-connection growth; loopback only.
SOAK_SECS ?= 180
soak: deps
	CSIS_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --locked --test soak -- --ignored --nocapture

# Real clients against the server with its default flags: ovirt-imageio's
# (4 workers, HTTP and HTTPS; installed into a throw-away virtualenv), a
# copy of two transfers at once with 4 workers each, nbdkit's curl plugin
# under nbdcopy, aria2c -x4, wget -c and curl -C -. Under a minute.
test-clients:
	@scripts/deps.sh --clients
	$(CARGO) build --locked
	scripts/test-clients.sh $${CARGO_TARGET_DIR:-target}/debug/cloudstack-image-server

# Throughput and latency of the server against qemu-nbd's own client on the
# same export (a few minutes; needs ~4 GiB in BENCH_TMP, default /var/tmp).
# Results and how to read them: bench/RESULTS.md.
# BENCH_PYTHON_SERVER adds CloudStack's Python server (needs python3-libnbd) on
# the same export in the same rounds, CPU beside ours: a directory is its
# newer imageserver package (HTTP and HTTPS rows), a file its old image_server.py
# (HTTP only).
FLOOR := $(or $(CARGO_TARGET_DIR),target)/release/examples/bench-floor
bench: build
	@scripts/deps.sh wrk
	$(CARGO) build --release --locked --example bench-floor
	python3 bench/bench.py $(BIN) $(FLOOR)

# A KVM host's full backup load against the default flags, every byte
# checked (bench/load.py): 50 transfers x 4 connections of ranged PUTs and
# GETs as imageio's client sends them, 2,000 idle keep-alive connections,
# a slow reader per transfer. Prints requests, refused, failed, peak RSS,
# the wait for a request slot p50/p99 and throughput (bench/RESULTS.md).
# Loopback only, about a minute. LOAD_IDLE=10000 for the 10,000-connection
# run; BENCH_PYTHON_SERVER (image_server.py or the imageserver package, as
# for bench) adds the same load against CloudStack's Python server.
load: build
	python3 bench/load.py $(BIN)

# fmt, clippy, and the module order docs/architecture.md declares
# (scripts/layers.py: no cycles, each module uses only those below it).
lint:
	@scripts/deps.sh --build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	python3 scripts/layers.py --check

# Packages for Debian/Ubuntu and RHEL/Fedora, from the release binary:
#   $(TARGET_DIR)/debian/cloudstack-image-server_<version>-1_<arch>.deb
#   $(TARGET_DIR)/generate-rpm/cloudstack-image-server-<version>-1.<arch>.rpm
# (TARGET_DIR is ./target unless CARGO_TARGET_DIR says otherwise.) The first
# run installs cargo-deb and cargo-generate-rpm (a few minutes of compiling).
# `--auto-req builtin`: the rpm's Requires come from ldd, the same whether or
# not rpm's find-requires is installed on the build machine.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
CARGO_DEB_VERSION ?= 3.8.0
CARGO_GENERATE_RPM_VERSION ?= 0.21.1

package-tools:
	@$(CARGO) deb --version >/dev/null 2>&1 || \
		$(CARGO) install --locked cargo-deb@$(CARGO_DEB_VERSION)
	@$(CARGO) generate-rpm --version >/dev/null 2>&1 || \
		$(CARGO) install --locked cargo-generate-rpm@$(CARGO_GENERATE_RPM_VERSION)

# The release profile keeps limited debug info (`debug = 1`) so that perf
# profiles of `make bench` name inlined functions and source lines; the
# packages ship a copy without debug sections (60 MB -> 9 MB; the symbol
# table stays, so backtraces still name functions). Both packages take this
# copy (Cargo.toml's assets).
STRIPPED := $(TARGET_DIR)/release/stripped/cloudstack-image-server

package: build package-tools
	rm -f $(TARGET_DIR)/debian/*.deb $(TARGET_DIR)/generate-rpm/*.rpm
	mkdir -p $(dir $(STRIPPED))
	objcopy --strip-debug $(BIN) $(STRIPPED)
	$(CARGO) deb --no-build --locked
	$(CARGO) generate-rpm --auto-req builtin
	@ls -l $(TARGET_DIR)/debian/*.deb $(TARGET_DIR)/generate-rpm/*.rpm

# Builds the packages, checks their metadata, installs the .deb and runs the
# installed binary (needs root or sudo: it installs and removes the package).
test-package: package
	tests/packaging.sh $(TARGET_DIR)

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
