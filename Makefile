# cloudstack-image-server: the two commands a new user needs are `make run`
# and `make test`; both install missing system packages first.

CARGO ?= cargo
BIN := target/release/cloudstack-image-server
DEMO_DIR ?= /tmp/cloudstack-image-server-demo
PORT ?= 54323

.PHONY: all deps build run demo test test-imageio fuzz soak lint fmt clean

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

# Every fuzz target for FUZZ_SECS seconds each (cargo-fuzz, libFuzzer).
FUZZ_SECS ?= 30
fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECS)

# 32 clients against 4 transfers for SOAK_SECS seconds, checked against a
# model of every image, RSS/fd/NBD-connection growth; loopback only.
SOAK_SECS ?= 180
soak: deps
	CSIS_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --locked --test soak -- --ignored --nocapture

# The real imageio client (ovirt-imageio, installed into a throw-away
# virtualenv) uploads and downloads through the server over HTTP and HTTPS.
test-imageio: deps
	$(CARGO) build --locked
	scripts/test-imageio.sh $${CARGO_TARGET_DIR:-target}/debug/cloudstack-image-server

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
