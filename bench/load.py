#!/usr/bin/env python3
"""`make load`: the server under a KVM host's full backup load, with its
default flags, every byte checked.

    python3 bench/load.py BINARY

LOAD_TRANSFERS (50) transfers, each a raw image behind its own qemu-nbd,
each served to LOAD_CONNS (4) keep-alive connections at once, as
ovirt-imageio's client (Veeam's) sends requests: ranged PUTs with
`Content-Range: bytes a-b/*` and ranged GETs, LOAD_ROUNDS (3) rounds of
writing then reading back each connection's own region in LOAD_CHUNK
(1 MiB) requests, every byte compared with a model. Meanwhile
LOAD_IDLE (2000) idle keep-alive connections (each sent one request and
then nothing), and one slow reader per transfer (a whole-region GET read
64 KiB at a time, 20 ms apart: it holds its request slot all along).

Prints: requests, refused (503), failed (anything else that is not the
exact answer, or wrong bytes), throughput of the verified transfers, the
server's peak RSS (VmHWM) and RSS at the end, and the wait for a request
slot p50/p99/max (from the server's start lines, `slot_wait_ms`), and the
time to the response head p50/p99 as the clients saw it.

BENCH_PYTHON_SERVER runs the same load against CloudStack's Python server
afterwards (needs python3-libnbd): its old image_server.py or its newer
imageserver package, as bench/bench.py's PythonServer starts either.
Loopback only; every loop is bounded by LOAD_ROUNDS and socket timeouts
(60 s). Temporary files in BENCH_TMP (/var/tmp): LOAD_TRANSFERS x
5 x LOAD_REGION (4 MiB) of images.
"""

import hashlib
import http.client
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PythonServer, QemuNbd, Server, log, status_kib  # noqa: E402

MIB = 1024 * 1024
TRANSFERS = int(os.environ.get("LOAD_TRANSFERS", "50"))
CONNS = int(os.environ.get("LOAD_CONNS", "4"))
IDLE = int(os.environ.get("LOAD_IDLE", "2000"))
ROUNDS = int(os.environ.get("LOAD_ROUNDS", "3"))
REGION = int(os.environ.get("LOAD_REGION", str(4 * MIB)))
CHUNK = int(os.environ.get("LOAD_CHUNK", str(MIB)))
SLOW_PIECE = 64 * 1024
SLOW_PAUSE = 0.02
TIMEOUT = 60
# Regions 0..CONNS-1 are written by the connections; the last one holds a
# fixed pattern, read by the slow reader.
SIZE = (CONNS + 1) * REGION
# What a failed request raises (the connection is then reopened).
ERRORS = (OSError, http.client.HTTPException)


def pattern(seed, length):
    """Deterministic bytes, cheap to make (a repeated digest)."""
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB
    reps = -(-length // len(block))
    return (block * reps)[:length]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.refused = 0
        self.failed = 0
        self.failures = {}
        self.verified = 0
        self.head_s = []

    def ok(self, nbytes, head_s, verified=True):
        """A request answered exactly; `nbytes` of the imageio-style
        transfers verified (the slow readers' bytes are not counted)."""
        with self.lock:
            self.requests += 1
            self.verified += nbytes if verified else 0
            self.head_s.append(head_s)

    def bad(self, kind, why, status=None):
        """A request refused (503) or failed: counted by its kind and why."""
        with self.lock:
            self.requests += 1
            if status == 503:
                self.refused += 1
            else:
                self.failed += 1
            key = f"{kind}: {why}"
            self.failures[key] = self.failures.get(key, 0) + 1


def request(conn, method, path, headers, body=None):
    """One request on a keep-alive connection: (status, body, seconds to
    the response head)."""
    t0 = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    head = time.perf_counter() - t0
    data = resp.read()
    return resp.status, data, head


def worker(host, port, tid, i, tally, stop_after):
    """One imageio-style connection: ROUNDS x (write the region, read it
    back), in CHUNK requests, each checked."""
    base = i * REGION
    path = f"/images/{tid}"
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    model = bytearray(REGION)
    try:
        for r in range(ROUNDS):
            for off in range(0, REGION, CHUNK):
                n = min(CHUNK, REGION - off)
                data = pattern(f"{tid}/{i}/{r}/{off}", n)
                a = base + off
                hdr = {"Content-Range": f"bytes {a}-{a + n - 1}/*", "Content-Length": str(n)}
                try:
                    st, body, head = request(conn, "PUT", path, hdr, data)
                except ERRORS as e:
                    tally.bad("PUT", type(e).__name__)
                    conn.close()
                    continue
                want = b'{"ok":true,"bytes_written":%d,"flushed":false}' % n
                if st == 200 and body == want:
                    model[off:off + n] = data
                    tally.ok(n, head)
                else:
                    tally.bad("PUT", f"{st} {body[:80].decode(errors='replace')}", st)
            for off in range(0, REGION, CHUNK):
                n = min(CHUNK, REGION - off)
                a = base + off
                try:
                    st, body, head = request(conn, "GET", path, {"Range": f"bytes={a}-{a + n - 1}"})
                except ERRORS as e:
                    tally.bad("GET", type(e).__name__)
                    conn.close()
                    continue
                if st == 206 and body == model[off:off + n]:
                    tally.ok(n, head)
                else:
                    why = "wrong bytes" if st == 206 else body[:80].decode(errors="replace")
                    tally.bad("GET", f"{st} {why}", st)
    finally:
        conn.close()
        stop_after.release()


def slow_reader(host, port, tid, fixed, tally, done):
    """GETs the fixed region 64 KiB at a time, 20 ms apart, until the
    workers are done (then finishes the GET in progress)."""
    a = CONNS * REGION
    path = f"/images/{tid}"
    while not done.is_set():
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"Range": f"bytes={a}-{a + REGION - 1}"})
            resp = conn.getresponse()
            head = time.perf_counter() - t0
            if resp.status != 206:
                body = resp.read()
                tally.bad("slow GET", f"{resp.status} {body[:80].decode(errors='replace')}",
                          resp.status)
                time.sleep(0.5)
                continue
            got = bytearray()
            while len(got) < REGION:
                piece = resp.read(SLOW_PIECE)
                if not piece:
                    break
                got += piece
                if not done.is_set():
                    time.sleep(SLOW_PAUSE)
            if got == fixed:
                tally.ok(len(got), head, verified=False)
            else:
                tally.bad("slow GET", "short or wrong body")
        except ERRORS as e:
            tally.bad("slow GET", type(e).__name__)
        finally:
            conn.close()


def open_idle(host, port, n, path):
    """n connections that each sent one request and then stay idle (a GET
    of /info/ for ours, OPTIONS of an image for the Python server, which has
    no /info/): the connections whose request got a 200, and how many did
    not."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        s.sendall(f"{path} HTTP/1.1\r\nHost: load\r\n\r\n".encode())
        socks.append(s)
    ok = []
    for s in socks:
        try:
            if b" 200 " in s.recv(4096).split(b"\r\n", 1)[0]:
                ok.append(s)
                continue
        except OSError:
            pass
        s.close()
    return ok, n - len(ok)


def keep_idle(socks, path, stop):
    """Every 20 s (below the server's 60 s keep-alive), one more request on
    each idle connection, so that they stay open however long the load runs;
    a connection the server closed is dropped from the list."""
    while not stop.wait(20):
        for s in list(socks):
            try:
                s.sendall(f"{path} HTTP/1.1\r\nHost: load\r\n\r\n".encode())
                if b" 200 " not in s.recv(4096).split(b"\r\n", 1)[0]:
                    raise OSError("no 200")
            except OSError:
                socks.remove(s)
                s.close()


def idle_alive(socks):
    """How many idle connections the server still holds open (no EOF)."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += s.recv(1) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def run_load(name, host, port, ids, pid, idle_path, server_log=None):
    fixed = pattern("fixed", REGION)
    tally = Tally()
    log(f"{name}: opening {IDLE} idle connections")
    idle, idle_failed = open_idle(host, port, IDLE, idle_path)
    done = threading.Event()
    pinger = threading.Thread(target=keep_idle, args=(idle, idle_path, done))
    pinger.start()
    finished = threading.Semaphore(0)
    slow = [threading.Thread(target=slow_reader, args=(host, port, tid, fixed, tally, done))
            for tid in ids]
    workers = [threading.Thread(target=worker, args=(host, port, tid, i, tally, finished))
               for tid in ids for i in range(CONNS)]
    rss = [0]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            rss[0] = max(rss[0], status_kib(pid, "VmRSS"))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    log(f"{name}: {len(slow)} slow readers, {len(workers)} connections of ranged PUTs and GETs")
    for t in slow:
        t.start()
    time.sleep(0.5)  # the slow readers take their slots first
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    for t in slow:
        t.join()
    pinger.join()
    alive = idle_alive(idle)
    for s in idle:
        s.close()
    sampling.set()
    sampler.join()
    hwm = status_kib(pid, "VmHWM")
    end_rss = status_kib(pid, "VmRSS")
    planned = CONNS * len(ids) * ROUNDS * REGION * 2
    print(f"### {name}\n")
    print("| what | figure |\n|---|---:|")
    print(f"| data requests (incl. slow GETs) | {tally.requests} |")
    print(f"| refused (503) | {tally.refused} |")
    print(f"| failed (other status, error, wrong bytes) | {tally.failed} |")
    print(f"| imageio-style PUT+GET verified (of {planned // MIB} MiB) | "
          f"{tally.verified // MIB} MiB in {wall:.1f} s = {tally.verified / MIB / wall:.0f} MiB/s |")
    print(f"| idle connections: first request failed / still open at the end | "
          f"{idle_failed} / {alive} of {IDLE} |")
    print(f"| server peak RSS (VmHWM) | {hwm // 1024} MiB |")
    print(f"| server RSS, sampled max / at the end | {rss[0] // 1024} / {end_rss // 1024} MiB |")
    print(f"| time to response head p50 / p99 / max | {pct(tally.head_s, 50) * 1000:.0f} / "
          f"{pct(tally.head_s, 99) * 1000:.0f} / {max(tally.head_s, default=0) * 1000:.0f} ms |")
    if server_log:
        with open(server_log) as f:
            waits = [int(m) for m in re.findall(r"slot_wait_ms=(\d+)", f.read())]
        print(f"| wait for a request slot p50 / p99 / max ({len(waits)} requests) | "
              f"{pct(waits, 50)} / {pct(waits, 99)} / {max(waits, default=0)} ms |")
    print()
    for why, n in sorted(tally.failures.items(), key=lambda kv: -kv[1]):
        print(f"- {n} x {why}")
    if tally.failures:
        print()
    sys.stdout.flush()
    return tally


def make_images(tmp):
    fixed = pattern("fixed", REGION)
    paths = []
    for t in range(TRANSFERS):
        p = os.path.join(tmp, f"t{t}.raw")
        with open(p, "wb") as f:
            f.truncate(SIZE)
            f.seek(CONNS * REGION)
            f.write(fixed)
        paths.append(p)
    return paths


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE + TRANSFERS * (CONNS + 1) * 2 + 256
    if hard < need:
        sys.exit(f"load: the open-file hard limit is {hard}; {need} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = os.environ.get("BENCH_TMP", "/var/tmp")
    tmp = tempfile.mkdtemp(prefix="csis-load-", dir=base)
    procs = []
    ok = True
    try:
        images = make_images(tmp)
        nbds = []
        for t, img in enumerate(images):
            nbds.append(QemuNbd(img, os.path.join(tmp, f"t{t}.sock"), "raw"))
            procs.append(nbds[-1])
        cfg = os.path.join(tmp, "cfg")
        os.mkdir(cfg)
        logfile = os.path.join(tmp, "server.log")
        os.environ.setdefault("BENCH_RUST_LOG", "info")
        server = Server(binary, cfg, logfile)
        procs.append(server)
        ids = []
        for t, nbd in enumerate(nbds):
            server.add_nbd(f"t{t}", nbd)
            ids.append(f"t{t}")
        print(f"## make load: {TRANSFERS} transfers x {CONNS} connections, {IDLE} idle "
              f"connections, {TRANSFERS} slow readers; default flags\n")
        tally = run_load("cloudstack-image-server", server.host, server.port, ids,
                         server.pid, "GET /info/", logfile)
        ok = tally.refused == 0 and tally.failed == 0
        with open(logfile) as f:
            limit = [l.strip() for l in f if "open-file limit" in l or "client connections" in l]
        for line in limit:
            print(f"- server log: `{line.split(']', 1)[-1].strip()}`")
        print()
        server.stop()
        if os.environ.get("BENCH_PYTHON_SERVER"):
            # Fresh images and exports: the same starting point.
            for p in nbds:
                p.stop()
            images = make_images(tmp)
            nbds = [QemuNbd(img, os.path.join(tmp, f"p{t}.sock"), "raw")
                    for t, img in enumerate(images)]
            procs.extend(nbds)
            python = PythonServer(os.environ["BENCH_PYTHON_SERVER"],
                                  os.path.join(tmp, "python.log"))
            procs.append(python)
            pids = [python.add_nbd(n) for n in nbds]
            run_load(python.what, "127.0.0.1", python.port, pids, python.pid,
                     f"OPTIONS /images/{pids[0]}")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
