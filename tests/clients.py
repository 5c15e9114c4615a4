#!/usr/bin/env python3
# Licensed to the Apache Software Foundation (ASF) under one or more
# contributor license agreements; the ASF licenses this file to you under
# the Apache License, Version 2.0.
"""
Real HTTP clients against the real server.

Checks ovirt-imageio's client library (what backup products use through
CloudStack's oVirt-compatible API) against cloudstack-image-server with the
server's default flags (but no HTTP Unix socket: these run over TCP), over
plain HTTP and over HTTPS (a self-signed certificate passed as cafile):

- OPTIONS advertises 4 writers and 4 readers, so the client runs 4 workers;
- upload() with 4 workers of a qcow2 with random data, allocated zeroes and
  unallocated clusters into a qcow2 exported by qemu-nbd (ranged PUTs and
  PATCH zero at once on one transfer), then `qemu-img compare`;
- download() with 4 workers of that export to a new qcow2, `qemu-img compare`;
- zero extents (with holes) from the server equal to those the client
  library reads from the same image through its own qemu-nbd;
- dirty extents after a few ranged writes through ImageioClient, with the
  export's dirty bitmap;
- GET /checksum (default blake2b, and sha256 with 1 MiB blocks) of a qcow2
  and of a raw image, each with data, zeroes and holes, equals what the
  client library's checksum() computes for the same local image.

Then, with `--unix-socket` on, beside HTTP and beside HTTPS: the client,
given the TCP URL, switches to the socket OPTIONS advertises (it checks its
TCP connection is local first); upload() and download() with 4 workers,
`qemu-img compare`, and the TCP port (behind a byte-counting proxy) carried
only the first OPTIONS, not the image.

Then, over HTTP on one server with its default flags:

- CloudStack's stress scenario: two disks copied at once, 4 workers each,
  ranged GETs from a source transfer and PUTs with Content-Range to a
  destination transfer; each destination compares equal to its source;
- `nbdkit curl url=...` (which asks for the size with HEAD) under `nbdcopy`
  downloads the image byte for byte;
- `aria2c -x4` (4 connections, ranged GETs) downloads it byte for byte;
- `wget -c` and `curl -C -` resume a partial download (206) to the same bytes.

Transfers are registered over the control socket, as the agent does.
Usage: clients.py SERVER_BINARY
Prints one PASS/FAIL line per check and a summary `clients: N passed, M failed`.
"""

import http.client
import json
import os
import urllib.request
import ssl
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from ovirt_imageio import client

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB

# Hang guard for every client command and HTTP request: far above what
# they take, so only a hung client or server trips it.
TIMEOUT = 180

# The clients' workers: what ovirt-imageio uses at most, and what the
# server advertises by default.
WORKERS = 4

# (offset, length, fill) written into a source image: a byte pattern,
# RANDOM (different data everywhere, so a byte at the wrong offset shows)
# or ZERO (allocated zeroes). Everything else stays unallocated.
RANDOM = "random"
ZERO = "zero"
SOURCE_LAYOUT = [
    (0, 1 * MiB, 0x11),
    (2 * MiB + 4 * KiB, 6 * MiB, RANDOM),
    (12 * MiB, 512 * KiB, 0x22),
    (16 * MiB, 1 * MiB, ZERO),
    (20 * MiB, 12 * MiB, RANDOM),
    (40 * MiB, 3 * MiB, 0x33),
    (48 * MiB, 8 * MiB + 12 * KiB, RANDOM),
    (SIZE - 64 * KiB, 64 * KiB, 0x44),
]

# Ranges written after the bitmap was added: 64 KiB aligned, the bitmap's
# granularity, so the dirty extents are exactly these.
DIRTY_WRITES = [
    (1 * MiB, 64 * KiB),
    (10 * MiB, 128 * KiB),
    (SIZE - 128 * KiB, 64 * KiB),
]

# Each worker of the stress copy moves this much per request.
STRESS_CHUNK = 2 * MiB

passed = 0
failed = 0


def check(name, fn):
    global passed, failed
    t0 = time.monotonic()
    try:
        fn()
    except Exception:
        failed += 1
        print("FAIL", name)
        traceback.print_exc()
    else:
        passed += 1
        print("PASS {} ({:.1f} s)".format(name, time.monotonic() - t0))
    sys.stdout.flush()


def run(*cmd):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError("{} failed: {}".format(
            " ".join(cmd), p.stdout.decode(errors="replace")))
    return p.stdout.decode(errors="replace")


def wait_for(pred, what, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


class QemuNbd:
    """qemu-nbd serving one image on a Unix socket; SIGTERM on stop."""

    def __init__(self, image, fmt, sock, bitmap=None, read_only=False):
        self.sock = sock
        if os.path.exists(sock):
            os.unlink(sock)
        cmd = ["qemu-nbd", "--socket=" + sock, "--persistent", "--shared=0",
               "--cache=writeback", "--allocation-depth", "-f", fmt]
        if bitmap:
            cmd += ["-B", bitmap]
        if read_only:
            cmd.append("--read-only")
        cmd.append(image)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-nbd exited: {}".format(cmd))
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
                return True
            except OSError:
                return False
            finally:
                s.close()
        wait_for(up, "qemu-nbd on " + sock)

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


class Server:
    """The server binary with its default limits on an ephemeral port, with
    its control socket, and its HTTP Unix socket at `unix_socket` (off
    unless given)."""

    def __init__(self, binary, workdir, tls=None, unix_socket=None):
        self.cfg = os.path.join(workdir, "config")
        os.makedirs(self.cfg, exist_ok=True)
        self.control_socket = os.path.join(workdir, "control.sock")
        self.unix_socket = unix_socket
        cmd = [binary, "--listen", "127.0.0.1", "--port", "0",
               "--config-dir", self.cfg,
               "--control-socket", self.control_socket,
               "--unix-socket", unix_socket or ""]
        if tls:
            cmd += ["--tls-enabled", "--tls-cert-file", tls[0],
                    "--tls-key-file", tls[1]]
        self.log_path = os.path.join(workdir, "server.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.log)
        line = self._first_line(30)
        prefix = "listening on "
        if not line.startswith(prefix):
            raise RuntimeError("unexpected server output {!r}; log: {}"
                               .format(line, self.log_tail()))
        self.base = line[len(prefix):].strip()
        self.host, port = self.base.split("://", 1)[1].rsplit(":", 1)
        self.port = int(port)

    def _first_line(self, timeout):
        result = []
        t = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline()),
            daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self.proc.kill()
            raise RuntimeError("server did not start; log: " + self.log_tail())
        return result[0].decode()

    def log_tail(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def url(self, transfer_id):
        return "{}/images/{}".format(self.base, transfer_id)

    def connection(self):
        """A keep-alive HTTP connection (plain HTTP servers only)."""
        return http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)

    def control(self, request):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        try:
            s.connect(self.control_socket)
            s.sendall((json.dumps(request) + "\n").encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        reply = json.loads(data)
        if reply.get("status") != "ok":
            raise RuntimeError("control {} -> {}".format(request, reply))
        return reply

    def register(self, transfer_id, nbd, bitmap=None):
        config = {"backend": "nbd", "socket": nbd.sock}
        if bitmap:
            config["export_bitmap"] = bitmap
        return self.control({"action": "register", "transfer_id": transfer_id,
                             "config": config})

    def stop(self):
        """SIGTERM; raises unless the server exits 0 (killed after 40 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        if self.proc.returncode != 0:
            raise RuntimeError("server exited with {} after SIGTERM; log: {}"
                               .format(self.proc.returncode, self.log_tail()))


def make_source(path):
    """A qcow2 of SOURCE_LAYOUT; its RANDOM ranges differ on every call."""
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    cmds = []
    noise = []
    try:
        for i, (off, length, fill) in enumerate(SOURCE_LAYOUT):
            if fill == ZERO:
                cmds += ["-c", "write -z {} {}".format(off, length)]
            elif fill == RANDOM:
                # qemu-io fills its buffer from the file: one file per range,
                # so that no two ranges hold the same bytes.
                noise.append("{}.random{}".format(path, i))
                with open(noise[-1], "wb") as f:
                    f.write(os.urandom(length))
                cmds += ["-c", "write -s {} {} {}".format(noise[-1], off, length)]
            else:
                cmds += ["-c", "write -P {} {} {}".format(fill, off, length)]
        run("qemu-io", "-f", "qcow2", *cmds, path)
    finally:
        for n in noise:
            os.unlink(n)


def make_cert(workdir):
    cert = os.path.join(workdir, "server.crt")
    key = os.path.join(workdir, "server.key")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
        "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", key, "-out", cert)
    return cert, key


def compare(a, b):
    out = run("qemu-img", "compare", a, b)
    if "Images are identical" not in out:
        raise AssertionError(out)


def same_bytes(path, want):
    """`cmp` of a downloaded file against the raw image."""
    p = subprocess.run(["cmp", path, want], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=TIMEOUT)
    if p.returncode != 0:
        raise AssertionError("cmp {} {}: {}".format(
            path, want, p.stdout.decode(errors="replace")))


def options(server, transfer_id, cafile):
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    req = urllib.request.Request(server.url(transfer_id), method="OPTIONS")
    with urllib.request.urlopen(req, context=ctx, timeout=TIMEOUT) as r:
        return json.load(r)


def empty_destination(server, workdir, name, nbds):
    """An empty qcow2 of SIZE bytes, exported by a qemu-nbd (added to
    `nbds`, for the caller to stop) and registered as transfer "dst".
    Returns (path, qemu-nbd)."""
    dst = os.path.join(workdir, name + ".qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(SIZE))
    dst_nbd = QemuNbd(dst, "qcow2", os.path.join(workdir, name + ".sock"))
    nbds.append(dst_nbd)
    server.register("dst", dst_nbd)
    return dst, dst_nbd


def advertises(server, cafile, unix_socket):
    """Raises unless OPTIONS of "dst" is the default one, with `unix_socket`."""
    got = options(server, "dst", cafile)
    want = {"unix_socket": unix_socket, "features": ["extents", "zero", "flush"],
            "max_readers": 4, "max_writers": WORKERS}
    if got != want:
        raise AssertionError("OPTIONS {} != {}".format(got, want))


def imageio_scenario(binary, workdir, src, tls):
    scheme = "https" if tls else "http"
    cafile = tls[0] if tls else None
    server = Server(binary, os.path.join(workdir, scheme), tls=tls)
    nbds = []
    try:
        if not server.base.startswith(scheme + "://"):
            raise RuntimeError("server says " + server.base)

        dst, dst_nbd = empty_destination(server, workdir, scheme + "-dst", nbds)
        check(scheme + ": OPTIONS advertises 4 readers and 4 writers by default",
              lambda: advertises(server, cafile, None))

        def upload():
            # upload() runs min(max_workers, the server's max_writers)
            # workers: 4 ranged PUTs and PATCH zero at once.
            client.upload(src, server.url("dst"), cafile, max_workers=WORKERS)
            compare(src, dst_nbd.uri())
        check(scheme + ": upload qcow2 with data and holes, 4 workers, qemu-img compare",
              upload)

        def download():
            out = os.path.join(workdir, scheme + "-download.qcow2")
            client.download(server.url("dst"), out, cafile, fmt="qcow2",
                            max_workers=WORKERS)
            compare(src, out)
        check(scheme + ": download to qcow2, 4 workers, qemu-img compare", download)

        src_nbd = QemuNbd(src, "qcow2", os.path.join(workdir, scheme + "-src.sock"),
                          read_only=True)
        nbds.append(src_nbd)
        server.register("src", src_nbd)

        def zero_extents():
            with client.ImageioClient(server.url("src"), cafile=cafile) as c:
                got = list(c.extents("zero"))
                size = c.size()
            want = list(client.extents(src))
            if size != SIZE:
                raise AssertionError("size {} != {}".format(size, SIZE))
            if got != want:
                raise AssertionError("server {}\n!= client {}".format(got, want))
            if not any(e.hole for e in got) or not any(
                    e.zero and not e.hole for e in got):
                raise AssertionError("expected holes and allocated zeroes: {}"
                                     .format(got))
        check(scheme + ": zero extents with holes equal the client's own", zero_extents)

        def checksums():
            raw = os.path.join(workdir, scheme + "-src.raw")
            run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-S", "4k",
                src, raw)
            raw_nbd = QemuNbd(raw, "raw", os.path.join(workdir, scheme + "-raw.sock"),
                              read_only=True)
            nbds.append(raw_nbd)
            server.register("raw", raw_nbd)
            ctx = ssl.create_default_context(cafile=cafile) if cafile else None
            for tid, path in (("src", src), ("raw", raw)):
                for query, kwargs in (
                        ("", {}),
                        ("?algorithm=sha256&block_size=1048576",
                         {"algorithm": "sha256", "block_size": MiB})):
                    url = server.url(tid) + "/checksum" + query
                    with urllib.request.urlopen(url, context=ctx, timeout=TIMEOUT) as r:
                        got = json.load(r)
                    want = client.checksum(path, **kwargs)
                    if got != want:
                        raise AssertionError("{}: server {} != client {}".format(
                            url, got, want))
        check(scheme + ": checksum of qcow2 and raw equals the client's", checksums)

        def dirty_extents():
            dst_nbd.stop()
            server.control({"action": "unregister", "transfer_id": "dst"})
            run("qemu-img", "bitmap", "--add", "--enable", dst, "b0")
            d = QemuNbd(dst, "qcow2", os.path.join(workdir, scheme + "-dirty.sock"),
                        bitmap="b0")
            nbds.append(d)
            server.register("dirty", d, bitmap="b0")
            with client.ImageioClient(server.url("dirty"), cafile=cafile) as c:
                for off, length in DIRTY_WRITES:
                    c.write(off, b"\x5a" * length)
                c.flush()
                got = [(e.start, e.length) for e in c.extents("dirty") if e.dirty]
                data = bytearray(DIRTY_WRITES[1][1])
                c.read(DIRTY_WRITES[1][0], data)
            if got != DIRTY_WRITES:
                raise AssertionError("dirty {} != written {}".format(got, DIRTY_WRITES))
            if data != b"\x5a" * len(data):
                raise AssertionError("read back differs")
            reply = server.control({"action": "unregister", "transfer_id": "dirty"})
            if reply != {"status": "ok", "active_transfers": 2}:
                raise AssertionError(reply)
        check(scheme + ": dirty extents after ranged writes", dirty_extents)
    finally:
        try:
            server.stop()
        finally:
            for n in nbds:
                n.stop()


class CountingProxy:
    """Forwards TCP connections from 127.0.0.1:<port> to `target` (host,
    port) as they are (TLS included) and counts the bytes both ways."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.bytes = 0
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client_side, _ = self.listener.accept()
            except OSError:
                return
            server_side = socket.create_connection(self.target, timeout=TIMEOUT)
            with self.lock:
                self.connections += 1
            for src, dst in ((client_side, server_side), (server_side, client_side)):
                threading.Thread(target=self._pump, args=(src, dst),
                                 daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(256 * KiB)
                if not data:
                    break
                with self.lock:
                    self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def counts(self):
        with self.lock:
            return self.bytes, self.connections

    def close(self):
        # shutdown() wakes the accept() blocked in the other thread.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


def unix_socket_scenario(binary, workdir, src, tls):
    """ovirt-imageio's client, given the TCP URL of a server with
    --unix-socket, uploads and downloads through the socket."""
    scheme = "https" if tls else "http"
    cafile = tls[0] if tls else None
    sock = os.path.join(workdir, scheme + "-imageio-http.sock")
    server = Server(binary, os.path.join(workdir, scheme + "-unix"), tls=tls,
                    unix_socket=sock)
    proxy = CountingProxy((server.host, server.port))
    nbds = []
    try:
        if not server.base.startswith(scheme + "://"):
            raise RuntimeError("server says " + server.base)
        dst, dst_nbd = empty_destination(server, workdir, scheme + "-unix-dst", nbds)
        # What the client is given: the TCP URL (through the proxy).
        url = "{}://127.0.0.1:{}/images/dst".format(scheme, proxy.port)

        check(scheme + "+unix: OPTIONS advertises the socket's path",
              lambda: advertises(server, cafile, sock))

        def only_options_over_tcp(what, transfer):
            """Runs `transfer`; raises unless it used at least one TCP
            connection (so the proxy is in the path) and moved the image
            elsewhere: the TCP bytes are far fewer than the image's data."""
            before, conns_before = proxy.counts()
            transfer()
            after, conns_after = proxy.counts()
            tcp_bytes, conns = after - before, conns_after - conns_before
            if conns < 1:
                raise AssertionError(what + " never connected over TCP")
            # The image holds 27 MiB of data; OPTIONS (and, for HTTPS, the
            # handshake) take a few KiB per connection.
            if tcp_bytes > 256 * KiB:
                raise AssertionError("{} sent {} bytes over {} TCP connections: "
                                     "not through the socket".format(what, tcp_bytes, conns))

        def upload():
            only_options_over_tcp("upload", lambda: client.upload(
                src, url, cafile, max_workers=WORKERS))
            compare(src, dst_nbd.uri())
        check(scheme + "+unix: upload through the socket, 4 workers, qemu-img compare",
              upload)

        def download():
            out = os.path.join(workdir, scheme + "-unix-download.qcow2")
            only_options_over_tcp("download", lambda: client.download(
                url, out, cafile, fmt="qcow2", max_workers=WORKERS))
            compare(src, out)
        check(scheme + "+unix: download through the socket, 4 workers, qemu-img compare",
              download)
    finally:
        proxy.close()
        try:
            server.stop()
        finally:
            for n in nbds:
                n.stop()
        if os.path.exists(sock):
            raise AssertionError(sock + " left behind after a clean stop")


def response(r, status, what):
    """The body of r; raises unless its status is `status`."""
    body = r.read()
    if r.status != status:
        raise AssertionError("{}: {} {} {!r}".format(what, r.status, r.reason, body[:300]))
    return body


def stress_copy(server, pairs):
    """Copies each (source, destination) transfer pair at once, WORKERS
    threads per pair, as CloudStack's stress test does: each worker takes
    the next STRESS_CHUNK, GETs it with Range from the source and PUTs it
    with Content-Range to the destination, on its own keep-alive
    connections. All workers start together; then each destination is
    flushed."""
    start = threading.Barrier(len(pairs) * WORKERS)
    errors = []

    def worker(src_id, dst_id, chunks, lock):
        get, put = server.connection(), server.connection()
        try:
            start.wait(timeout=TIMEOUT)
            while True:
                with lock:
                    if not chunks or errors:
                        return
                    off = chunks.pop()
                end = min(off + STRESS_CHUNK, SIZE) - 1
                get.request("GET", "/images/" + src_id,
                            headers={"Range": "bytes={}-{}".format(off, end)})
                r = get.getresponse()
                data = response(r, 206, "GET {} {}-{}".format(src_id, off, end))
                want_range = "bytes {}-{}/{}".format(off, end, SIZE)
                if r.getheader("Content-Range") != want_range or len(data) != end - off + 1:
                    raise AssertionError("GET {}: Content-Range {} and {} bytes, want {}".format(
                        src_id, r.getheader("Content-Range"), len(data), want_range))
                put.request("PUT", "/images/" + dst_id, body=data, headers={
                    "Content-Range": "bytes {}-{}/*".format(off, end),
                    "Content-Length": str(len(data))})
                reply = json.loads(response(put.getresponse(), 200,
                                            "PUT {} {}-{}".format(dst_id, off, end)))
                if reply != {"ok": True, "bytes_written": len(data), "flushed": False}:
                    raise AssertionError("PUT {}: {}".format(dst_id, reply))
        except Exception as e:
            errors.append(e)
            start.abort()
        finally:
            get.close()
            put.close()

    threads = []
    for src_id, dst_id in pairs:
        chunks = list(range(0, SIZE, STRESS_CHUNK))
        lock = threading.Lock()
        for _ in range(WORKERS):
            threads.append(threading.Thread(
                target=worker, args=(src_id, dst_id, chunks, lock), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        if t.is_alive():
            raise RuntimeError("a stress worker hung")
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    for _, dst_id in pairs:
        c = server.connection()
        try:
            c.request("POST", "/images/{}/flush".format(dst_id))
            response(c.getresponse(), 200, "flush " + dst_id)
        finally:
            c.close()


def clients_scenario(binary, workdir, src):
    """The stress copy and the download clients against one server with its
    default flags, over HTTP."""
    server = Server(binary, os.path.join(workdir, "clients"))
    nbds = []
    try:
        raw = os.path.join(workdir, "clients-src.raw")
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, raw)
        dl = QemuNbd(src, "qcow2", os.path.join(workdir, "dl.sock"), read_only=True)
        nbds.append(dl)
        server.register("dl", dl)
        url = server.url("dl")
        out = os.path.join(workdir, "out")
        os.mkdir(out)

        def stress():
            pairs = []
            for i in range(2):
                s = os.path.join(workdir, "stress-src{}.qcow2".format(i))
                d = os.path.join(workdir, "stress-dst{}.qcow2".format(i))
                make_source(s)
                run("qemu-img", "create", "-q", "-f", "qcow2", d, str(SIZE))
                s_nbd = QemuNbd(s, "qcow2", s + ".sock", read_only=True)
                nbds.append(s_nbd)
                d_nbd = QemuNbd(d, "qcow2", d + ".sock")
                nbds.append(d_nbd)
                server.register("stress-src{}".format(i), s_nbd)
                server.register("stress-dst{}".format(i), d_nbd)
                pairs.append((s, d_nbd))
            stress_copy(server, [("stress-src{}".format(i), "stress-dst{}".format(i))
                                 for i in range(2)])
            for s, d_nbd in pairs:
                compare(s, d_nbd.uri())
        check("http: two transfers copied at once, 4 workers each "
              "(ranged GET, PUT Content-Range), qemu-img compare", stress)

        def nbdkit_curl():
            # nbdcopy starts nbdkit itself (socket activation); the curl
            # plugin asks for the size with HEAD, then reads with ranged GETs.
            dest = os.path.join(out, "nbdkit.raw")
            open(dest, "wb").close()
            run("nbdcopy", "--", "[", "nbdkit", "--exit-with-parent", "-r",
                "curl", "url=" + url, "]", dest)
            same_bytes(dest, raw)
        check("http: nbdkit curl + nbdcopy download, cmp", nbdkit_curl)

        def aria2c():
            run("aria2c", "--quiet", "-x4", "-s4", "--min-split-size=1M",
                "--max-tries=1", "--file-allocation=none",
                "--allow-overwrite=true", "--auto-file-renaming=false",
                "-d", out, "-o", "aria2c.raw", url)
            same_bytes(os.path.join(out, "aria2c.raw"), raw)
        check("http: aria2c -x4 download, cmp", aria2c)

        def partial(path):
            """The first bytes of the image, as an interrupted download
            leaves them."""
            with open(raw, "rb") as f, open(path, "wb") as p:
                p.write(f.read(21 * MiB + 12345))

        def wget_c():
            # wget names the file after the URL's last part: the transfer id.
            dest = os.path.join(out, "dl")
            partial(dest)
            log = run("wget", "-c", "--tries=1", "--server-response", "-nv",
                      "-P", out, url)
            if "HTTP/1.1 206" not in log:
                raise AssertionError("wget -c did not resume with 206:\n" + log)
            same_bytes(dest, raw)
        check("http: wget -c resumes a partial download, cmp", wget_c)

        def curl_c():
            dest = os.path.join(out, "curl.raw")
            partial(dest)
            code = run("curl", "-sS", "--fail", "-C", "-", "-o", dest,
                       "-w", "%{http_code}", url)
            if code != "206":
                raise AssertionError("curl -C - got {}, want 206".format(code))
            same_bytes(dest, raw)
        check("http: curl -C - resumes a partial download, cmp", curl_c)
    finally:
        try:
            server.stop()
        finally:
            for n in nbds:
                n.stop()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    # Every client talks to 127.0.0.1 directly, whatever proxy the
    # environment names.
    for k in list(os.environ):
        if k.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            del os.environ[k]
    base = os.environ.get("CSIS_TEST_TMP") or None
    workdir = tempfile.mkdtemp(prefix="csis-clients-", dir=base)
    try:
        src = os.path.join(workdir, "src.qcow2")
        make_source(src)
        check("http: imageio server, exports, registration, clean stop",
              lambda: imageio_scenario(binary, workdir, src, None))
        check("https: imageio server, exports, registration, clean stop",
              lambda: imageio_scenario(binary, workdir, src, make_cert(workdir)))
        check("http+unix: imageio through the socket, clean stop",
              lambda: unix_socket_scenario(binary, workdir, src, None))
        check("https+unix: imageio through the socket, clean stop",
              lambda: unix_socket_scenario(binary, workdir, src, make_cert(workdir)))
        check("http: clients server, exports, registration, clean stop",
              lambda: clients_scenario(binary, workdir, src))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("clients: {} passed, {} failed".format(passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
