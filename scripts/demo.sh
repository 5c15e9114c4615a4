#!/usr/bin/env bash
# Starts the server in the foreground with a ready `demo` transfer: a 64 MiB
# qcow2 with some data and an enabled dirty bitmap `demo-bitmap`, served by
# qemu-nbd on a Unix socket, and its config in the config dir. The README's
# curl examples then work against http://127.0.0.1:PORT/images/demo.
# Ctrl-C stops the server and qemu-nbd.
set -euo pipefail

BIN=${1:-target/release/cloudstack-image-server}
DIR=${2:-/tmp/cloudstack-image-server-demo}
PORT=${3:-54322}
CFG="$DIR/config"
IMG="$DIR/demo.qcow2"
SOCK="$DIR/demo.sock"

mkdir -p "$CFG"
if [ -f "$DIR/qemu-nbd.pid" ] && kill -0 "$(cat "$DIR/qemu-nbd.pid")" 2>/dev/null; then
    kill "$(cat "$DIR/qemu-nbd.pid")" && sleep 0.5
fi
rm -f "$SOCK" "$IMG"
qemu-img create -q -f qcow2 "$IMG" 64M
qemu-io -f qcow2 -c "write -P 0xab 0 1M" -c "write -P 0xcd 8M 2M" "$IMG" >/dev/null
qemu-img bitmap --add --enable "$IMG" demo-bitmap
# Writes after the bitmap was added show up as dirty extents.
qemu-io -f qcow2 -c "write -P 0xef 32M 1M" "$IMG" >/dev/null

qemu-nbd --socket="$SOCK" --persistent --shared=0 --cache=writeback --allocation-depth \
    --pid-file="$DIR/qemu-nbd.pid" -f qcow2 -B demo-bitmap "$IMG" &
NBD_PID=$!
trap 'kill $NBD_PID 2>/dev/null || true; wait $NBD_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done

printf '{"backend": "nbd", "socket": "%s", "export_bitmap": "demo-bitmap"}\n' "$SOCK" > "$CFG/demo"

cat <<MSG

Demo transfer 'demo': $IMG (64 MiB qcow2) behind qemu-nbd on $SOCK
Config: $CFG/demo
Try:   curl -i -X OPTIONS http://127.0.0.1:$PORT/images/demo
       curl -s http://127.0.0.1:$PORT/images/demo/extents
       curl -s --unix-socket $DIR/http.sock http://localhost/images/demo/extents
Ctrl-C stops the server and qemu-nbd.

MSG
"$BIN" --listen 127.0.0.1 --port "$PORT" --config-dir "$CFG" --control-socket "$DIR/control.sock" \
    --unix-socket "$DIR/http.sock" &
SRV=$!
trap 'kill $SRV 2>/dev/null || true; kill $NBD_PID 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM
wait $SRV
