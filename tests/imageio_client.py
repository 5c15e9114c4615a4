#!/usr/bin/env python3
# Licensed to the Apache Software Foundation (ASF) under one or more
# contributor license agreements; the ASF licenses this file to you under
# the Apache License, Version 2.0.
"""
The real imageio client against the real server.

Runs ovirt-imageio's client library (what backup products use through
CloudStack's oVirt-compatible API) against cloudstack-image-server over
plain HTTP and over HTTPS (a self-signed certificate passed as cafile):

- upload() of a qcow2 with data, allocated zeroes and unallocated clusters
  into a qcow2 exported by qemu-nbd, then `qemu-img compare`;
- download() of that export to a new qcow2, then `qemu-img compare`;
- zero extents (with holes) from the server equal to those the client
  library reads from the same image through its own qemu-nbd;
- dirty extents after a few ranged writes through ImageioClient, with the
  export's dirty bitmap;
- GET /checksum (default blake2b, and sha256 with 1 MiB blocks) of a qcow2
  and of a raw image, each with data, zeroes and holes, equals what the
  client library's checksum() computes for the same local image.

Transfers are registered over the control socket, as the agent does.
Usage: imageio_client.py SERVER_BINARY
Prints one line per check and a summary `imageio: N passed, M failed`.
"""

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
SIZE = 32 * MiB

# (offset, length, pattern) written into the source; 0 means write -z
# (allocated zeroes). Everything else stays unallocated.
SOURCE_LAYOUT = [
    (0, 1 * MiB, 0x11),
    (4 * MiB, 512 * KiB, 0x22),
    (8 * MiB, 1 * MiB, 0),
    (20 * MiB, 3 * MiB, 0x33),
    (SIZE - 64 * KiB, 64 * KiB, 0x44),
]

# Ranges written after the bitmap was added: 64 KiB aligned, the bitmap's
# granularity, so the dirty extents are exactly these.
DIRTY_WRITES = [
    (1 * MiB, 64 * KiB),
    (10 * MiB, 128 * KiB),
    (SIZE - 128 * KiB, 64 * KiB),
]

passed = 0
failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
    except Exception:
        failed += 1
        print("FAIL", name)
        traceback.print_exc()
    else:
        passed += 1
        print("ok  ", name)
    sys.stdout.flush()


def run(*cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
    """The server binary on an ephemeral port with its control socket."""

    def __init__(self, binary, workdir, tls=None):
        self.cfg = os.path.join(workdir, "config")
        os.makedirs(self.cfg, exist_ok=True)
        self.control_socket = os.path.join(workdir, "control.sock")
        cmd = [binary, "--listen", "127.0.0.1", "--port", "0",
               "--config-dir", self.cfg,
               "--control-socket", self.control_socket]
        if tls:
            cmd += ["--tls-enabled",
                    "--tls-cert-file", tls[0], "--tls-key-file", tls[1]]
        self.log_path = os.path.join(workdir, "server.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.log)
        line = self._first_line(30)
        prefix = "listening on "
        if not line.startswith(prefix):
            raise RuntimeError("unexpected server output {!r}; log in {}"
                               .format(line, self.log_path))
        self.base = line[len(prefix):].strip()

    def _first_line(self, timeout):
        result = []
        t = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline()),
            daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self.proc.kill()
            raise RuntimeError("server did not start; log in " + self.log_path)
        return result[0].decode()

    def url(self, transfer_id):
        return "{}/images/{}".format(self.base, transfer_id)

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
        """SIGTERM; returns the exit status (killed after 40 s: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode


def make_source(path):
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    cmds = []
    for off, length, pattern in SOURCE_LAYOUT:
        if pattern:
            cmds += ["-c", "write -P {} {} {}".format(pattern, off, length)]
        else:
            cmds += ["-c", "write -z {} {}".format(off, length)]
    run("qemu-io", "-f", "qcow2", *cmds, path)


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


def scenario(binary, workdir, src, tls):
    scheme = "https" if tls else "http"
    cafile = tls[0] if tls else None
    server = Server(binary, os.path.join(workdir, scheme), tls=tls)
    nbds = []
    try:
        if not server.base.startswith(scheme + "://"):
            raise RuntimeError("server says " + server.base)

        dst = os.path.join(workdir, scheme + "-dst.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(SIZE))
        dst_nbd = QemuNbd(dst, "qcow2", os.path.join(workdir, scheme + "-dst.sock"))
        nbds.append(dst_nbd)
        server.register("dst", dst_nbd)

        def upload():
            client.upload(src, server.url("dst"), cafile)
            compare(src, dst_nbd.uri())
        check(scheme + ": upload qcow2 with data and holes, qemu-img compare", upload)

        def download():
            out = os.path.join(workdir, scheme + "-download.qcow2")
            client.download(server.url("dst"), out, cafile, fmt="qcow2")
            compare(src, out)
        check(scheme + ": download to qcow2, qemu-img compare", download)

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
                    with urllib.request.urlopen(url, context=ctx) as r:
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
        rc = server.stop()
        for n in nbds:
            n.stop()
    if rc != 0:
        raise RuntimeError("server exited with {} after SIGTERM; log: {}".format(
            rc, open(server.log_path, errors="replace").read()[-4000:]))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    base = os.environ.get("CSIS_TEST_TMP") or None
    workdir = tempfile.mkdtemp(prefix="csis-imageio-", dir=base)
    try:
        src = os.path.join(workdir, "src.qcow2")
        make_source(src)
        check("http: server, exports, registration, clean stop",
              lambda: scenario(binary, workdir, src, None))
        check("https: server, exports, registration, clean stop",
              lambda: scenario(binary, workdir, src, make_cert(workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("imageio: {} passed, {} failed".format(passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
