# cloudstack-image-server: the two commands a new user needs are `make run`
# and `make test`; both install missing system packages first.

CARGO ?= cargo
BIN := $(or $(CARGO_TARGET_DIR),target)/release/cloudstack-image-server
DEMO_DIR ?= /tmp/cloudstack-image-server-demo
PORT ?= 54323

.PHONY: all deps build run demo test lint fmt clean bench

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

# Throughput and latency of the server against qemu-nbd's own client on the
# same export (a few minutes; needs ~4 GiB in BENCH_TMP, default /var/tmp).
# Results and how to read them: bench/RESULTS.md.
bench: build
	@scripts/deps.sh wrk
	python3 bench/bench.py $(BIN)

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
