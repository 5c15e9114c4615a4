#!/usr/bin/env python3
"""Benchmark: the server against qemu-nbd's own client (nbdcopy) on the same
export, interleaved in one run so a loaded machine hurts both alike.

Usage: bench/bench.py SERVER_BINARY [FLOOR_BINARY]

FLOOR_BINARY (bench/floor.rs, built by `make bench`) is a minimal libnbd to
plain-TCP copier with no HTTP framework: measured beside the server, it shows
how much of the gap to nbdcopy is the server's and how much is HTTP over TCP.

Needs qemu-img, qemu-nbd, qemu-io, nbdcopy, curl and wrk. Python stdlib only.
Prints markdown tables ready to paste into bench/RESULTS.md.

qemu-nbd runs with MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824
(QEMU_NBD_TUNING) except for the rows marked "qemu-nbd untuned", which use a second
qemu-nbd of the same image started without them.

Environment: BENCH_TMP (default /var/tmp) holds the ~3.5 GiB of test files;
BENCH_ROUNDS (default 3) is the number of interleaved rounds (best is kept);
BENCH_SIZE_MIB (default 2048, a multiple of 8) is the size of the raw image
(three quarters of it random data, the upload source): small values make a
quick check of the bench itself, not figures to compare.

The HTTPS rows ("https: ..." and "floor https: ...") run the same binary
and floor with TLS on (a certificate the bench makes with openssl; the floor
speaks TLS through rustls' unbuffered API behind the server's own rustls
configuration), and a table sets what TLS adds over HTTP beside the cipher's
own cost measured in the run (bench-floor --cipher-cost: ring's AEADs; and
`openssl speed -evp`: the clients'); BENCH_TLS=0 leaves them out.

The imageio rows (imageio_rows) need the virtualenv `make test-clients` keeps
in target/imageio-venv (BENCH_IMAGEIO_VENV names another) and openssl, and are
skipped without them; BENCH_IMAGEIO_ONLY=1 runs only them.

BENCH_PYTHON_SERVER adds CloudStack's Python server (the server this one
replaces; needs python3-libnbd for /usr/bin/python3) on the same tuned
qemu-nbd export, in the same rounds, with its CPU per GiB beside ours and
the ratio per transfer. It names either form:
- the newer `imageserver` package (a directory: the package, or the one
  holding it, as apache/cloudstack's scripts/vm/hypervisor/kvm/ does): rows
  "python: ..." over HTTP and "python https: ..." over HTTPS (a second
  process with --tls-enabled and the HTTPS rows' certificate), GET ×1, 4
  ranged GETs, curl -T and 4 ranged PUTs each. Started as the agent starts
  it (`python3 -m imageserver --listen 127.0.0.1 --port P`, the directory on
  PYTHONPATH), with a control socket of the bench's own (--control-socket)
  where the transfer is registered, as the agent does, with one JSON line
  (at its fixed /var/run/cloudstack/image-server.sock if it takes no
  --control-socket, refused if another server answers there).
- the old script image_server.py (a file): rows "python: ..." over HTTP
  only (it has no TLS) and no "PUT ×4 ranged" (its PUT refuses
  Content-Range and takes one writer). It reads transfers only from
  /tmp/imagetransfer, so the bench writes one config file there (a unique
  name, removed at the end).
"""

import datetime
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

GIB = 1024**3
MIB = 1024**2
IMAGE_SIZE = int(os.environ.get("BENCH_SIZE_MIB", "2048")) * MIB
DATA_SIZE = IMAGE_SIZE // 4 * 3
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
# glibc settings that stop qemu-nbd's heap from giving each request's bounce
# buffer back to the kernel and faulting it in again (README, "Performance").
QEMU_NBD_TUNING = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def cpu_seconds(pid):
    """utime + stime of a process (and its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def minor_faults(pid):
    """Minor page faults of a process so far (qemu-nbd's allocator churn)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Proc:
    """A long-running child we started; stopped by its own pid."""

    def __init__(self, cmd, **kw):
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)

    @property
    def pid(self):
        return self.p.pid

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class QemuNbd(Proc):
    def __init__(self, image, sock, fmt, bitmap=None, tuned=True):
        cmd = ["qemu-nbd", "--socket", sock, "--shared=0", "--persistent", "--cache=writeback", "-f", fmt]
        if bitmap:
            cmd += ["-B", bitmap]
        env = dict(os.environ)
        for k in QEMU_NBD_TUNING:
            env.pop(k, None)
        if tuned:
            env.update(QEMU_NBD_TUNING)
        super().__init__(cmd + [image], stdout=subprocess.DEVNULL, env=env)
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if time.time() > deadline or self.p.poll() is not None:
                raise RuntimeError(f"qemu-nbd did not start on {sock}")
            time.sleep(0.02)


class Server(Proc):
    def __init__(self, binary, config_dir, logfile, extra=(), env=None):
        env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"), **(env or {}))
        cmd = [binary, "--listen", "127.0.0.1", "--port", "0", "--config-dir", config_dir]
        usage = run([binary, "--help"]).stdout
        # No sockets unless asked: never clash with a running server.
        for flag in ("--control-socket", "--unix-socket"):
            if flag in usage and flag not in extra:
                cmd += [flag, ""]
        super().__init__(
            cmd + list(extra),
            stdout=subprocess.PIPE, stderr=open(logfile, "w"), env=env, text=True,
        )
        line = self.p.stdout.readline()
        m = re.search(r"listening on (https?)://(\S+)", line)
        if not m:
            raise RuntimeError(f"server did not start: {line!r}; see {logfile}")
        self.scheme, self.addr = m.groups()
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)
        self.config_dir = config_dir
        threading.Thread(target=self.p.stdout.read, daemon=True).start()

    def add_nbd(self, tid, nbd, bitmap=None):
        cfg = {"backend": "nbd", "socket": nbd.sock}
        if bitmap:
            cfg["export_bitmap"] = bitmap
        with open(os.path.join(self.config_dir, tid), "w") as f:
            json.dump(cfg, f)

    def url(self, tid):
        return f"{self.scheme}://{self.addr}/images/{tid}"


def client_cpu():
    """CPU of the clients: the commands run (once reaped) and the bench's
    own upload threads."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + THREAD_CPU.total


def measure(fn, server_pid, nbd_pid):
    """Times a command and the CPU the server (or the floor), qemu-nbd and
    the client (curl or nbdcopy, or the bench's upload threads) spent
    meanwhile: (seconds, [server, qemu-nbd, client] CPU s, qemu-nbd's minor
    faults)."""
    pids = [server_pid, nbd_pid]
    cpu0 = [cpu_seconds(p) for p in pids] + [client_cpu()]
    flt0 = minor_faults(nbd_pid)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    cpu1 = [cpu_seconds(p) for p in pids] + [client_cpu()]
    cpu = [b - a for a, b in zip(cpu0, cpu1)]
    return dt, cpu, minor_faults(nbd_pid) - flt0


def make_data(tmp):
    """DATA_SIZE of random data (the upload source) and a raw image of
    IMAGE_SIZE whose first DATA_SIZE bytes are that data and the rest a hole."""
    data = os.path.join(tmp, "data.bin")
    image = os.path.join(tmp, "image.raw")
    log(f"writing {DATA_SIZE // MIB} MiB of random data")
    with open("/dev/urandom", "rb") as src, open(data, "wb") as dst:
        left = DATA_SIZE
        while left:
            n = min(left, 16 * MIB)
            dst.write(src.read(n))
            left -= n
    shutil.copyfile(data, image)
    os.truncate(image, IMAGE_SIZE)
    return data, image


def make_qcow2(path, size, bitmap, writes):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    run(["qemu-img", "bitmap", "--add", "--enable", path, bitmap])
    # qemu-io takes many -c commands per process; batch to keep argv modest.
    for i in range(0, len(writes), 4000):
        cmd = ["qemu-io", "-f", "qcow2"]
        for off, ln in writes[i:i + 4000]:
            cmd += ["-c", f"write -q -P 7 {off} {ln}"]
        run(cmd + [path])


# The CA certificate HTTPS clients of the bench trust (make_cert sets it).
CA_FILE = None


def make_cert(work):
    """A self-signed P-256 certificate for 127.0.0.1 and its key in `work`
    (what the HTTPS rows serve with; the CloudStack agent's certificate is
    RSA or EC alike); sets CA_FILE. Returns the server flags that use it."""
    global CA_FILE
    cert, key = os.path.join(work, "server.crt"), os.path.join(work, "server.key")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert])
    CA_FILE = cert
    return ["--tls-enabled", "--tls-cert-file", cert, "--tls-key-file", key]


def curl_tls(url):
    """curl's flags to trust the bench's certificate for an https URL."""
    return ["--cacert", CA_FILE] if url.startswith("https:") else []


def curl_get(url, rng=None):
    cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", *curl_tls(url), url]
    if rng:
        cmd += ["-r", rng]
    return cmd


def curl_put(url, path):
    return ["curl", "-sS", "--fail", "-o", "/dev/null", *curl_tls(url), "-T", path, url]


def parts(total, n):
    """(offset, length) of n consecutive parts of total bytes; the last
    takes the remainder."""
    step = total // n
    return [(i * step, step if i < n - 1 else total - i * step) for i in range(n)]


class ThreadCpu:
    """CPU seconds spent by client threads of the bench itself (the ranged
    uploads), each measured with RUSAGE_THREAD: what a separate client
    process would add to RUSAGE_CHILDREN."""

    def __init__(self):
        self.total = 0.0
        self.lock = threading.Lock()

    @staticmethod
    def now():
        r = resource.getrusage(resource.RUSAGE_THREAD)
        return r.ru_utime + r.ru_stime

    def add(self, seconds):
        with self.lock:
            self.total += seconds


THREAD_CPU = ThreadCpu()


def put_range(url, path, offset, length):
    """One imageio upload worker's request: PUT `length` bytes of `path`
    from `offset` to the same offset of the image, with Content-Range, on
    its own connection. The body goes by sendfile(2) (the GIL released), so
    the client costs no more than curl -T, and no interpreter starts. Over
    HTTPS (Python's ssl, OpenSSL, like imageio's client) the body is read
    and sent in pieces by Python instead."""
    cpu0 = THREAD_CPU.now()
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=600) as raw, \
            open(path, "rb") as f:
        sock = raw
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=CA_FILE)
            sock = ctx.wrap_socket(raw, server_hostname=u.hostname)
        sock.sendall((f"PUT {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                      f"Content-Length: {length}\r\n"
                      f"Content-Range: bytes {offset}-{offset + length - 1}/*\r\n\r\n").encode())
        sent = sock.sendfile(f, offset, length)
        r = http.client.HTTPResponse(sock)
        r.begin()
        body = r.read()
    THREAD_CPU.add(THREAD_CPU.now() - cpu0)
    if sent != length or r.status != 200:
        raise RuntimeError(f"PUT {offset}+{length}: sent {sent}, {r.status} {body[:200]!r}")


def put_ranges(url, path, n):
    """n upload workers (callables for parallel()), one part of `path` each."""
    return [lambda off=off, ln=ln: put_range(url, path, off, ln)
            for off, ln in parts(os.path.getsize(path), n)]


def parallel(cmds, jobs=()):
    """Runs the commands and, in threads, the callables `jobs`, all at once."""
    errors = []

    def thread(job):
        try:
            job()
        except Exception as e:
            errors.append(e)

    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in cmds]
    threads = [threading.Thread(target=thread, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    rcs = [p.wait() for p in procs]
    for t in threads:
        t.join()
    if any(rcs):
        raise RuntimeError(f"command failed: {cmds} -> {rcs}")
    if errors:
        raise errors[0]


def call(cmd):
    return lambda: run(cmd)


def extents_latency(server, tid, query=""):
    """Best and median wall time of GET .../extents on a fresh connection,
    the extent count and the server's CPU seconds per call."""
    times = []
    count = 0
    cpu0 = cpu_seconds(server.pid)
    for _ in range(5):
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(server.host, server.port, timeout=120)
        c.request("GET", f"/images/{tid}/extents{query}")
        r = c.getresponse()
        body = r.read()
        times.append(time.perf_counter() - t0)
        c.close()
        if r.status != 200:
            raise RuntimeError(f"extents {tid}{query}: {r.status} {body[:200]!r}")
        count = len(json.loads(body))
    cpu = (cpu_seconds(server.pid) - cpu0) / len(times)
    times.sort()
    return times[0], times[len(times) // 2], count, cpu


def wrk(url, conns, secs):
    out = run(["wrk", f"-t{min(conns, 2)}", f"-c{conns}", f"-d{secs}s",
               "-H", "Range: bytes=0-4095", url]).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)\b", out)
    lat_ms = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw errors: {out}")
    return rps, lat_ms, requests


class RssPoller:
    def __init__(self, pid):
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            time.sleep(0.01)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.t.join()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    floor = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else None
    for tool in ["qemu-img", "qemu-nbd", "qemu-io", "nbdcopy", "curl", "wrk"]:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found")
    base = os.environ.get("BENCH_TMP", "/var/tmp")
    free = shutil.disk_usage(base).free
    need = IMAGE_SIZE + DATA_SIZE + GIB // 2
    if free < need:
        sys.exit(f"bench: {base} has {free // MIB} MiB free; need {need // MIB} MiB (set BENCH_TMP)")
    tmp = tempfile.mkdtemp(prefix="csis-bench-", dir=base)
    procs = []
    try:
        bench(binary, floor, tmp, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


class Floor(Proc):
    """bench/floor.rs serving the raw export; over HTTPS with `tls`, the
    server's flags from make_cert (the floor then uses the server's own
    rustls configuration)."""

    def __init__(self, binary, nbd, tls=(), env=None):
        args = ["--tls", tls[2], tls[4]] if tls else []
        super().__init__([binary, nbd.sock, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=dict(os.environ, **(env or {})))
        line = self.p.stdout.readline()
        m = re.search(r"listening on (https?://\S+)", line)
        if not m:
            raise RuntimeError(f"bench-floor did not start: {line!r}")
        self.base = m.group(1)

    def url(self, tid):
        return f"{self.base}/images/{tid}"


class PythonServer(Proc):
    """CloudStack's Python server (BENCH_PYTHON_SERVER) on a free loopback
    port, in one of its two forms:

    - the old script image_server.py (a file): it reads transfer configs
      only from /tmp/imagetransfer, so `add_nbd` writes one there under a
      unique name and `stop` removes it; plain HTTP only.
    - the newer package imageserver (a directory: the package or the one
      holding it), started as the agent starts it, `python3 -m imageserver
      --listen ADDR --port P [--tls-enabled --tls-cert-file F --tls-key-file
      F]` with the directory on PYTHONPATH; `add_nbd` registers the transfer
      on its Unix control socket (one JSON line), at a path of the bench's
      own when the package takes --control-socket, else at its fixed
      CONTROL_SOCKET, refused if another server answers there.

    `tls` is make_cert's flags (the package only)."""

    CFG_DIR = "/tmp/imagetransfer"
    CONTROL_SOCKET = "/var/run/cloudstack/image-server.sock"
    PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"

    def __init__(self, path, logfile, tls=()):
        run([self.PYTHON, "-c", "import nbd"])  # python3-libnbd, or a clear failure
        path = os.path.abspath(path)
        self.package = os.path.isdir(path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        listen = ["--listen", "127.0.0.1", "--port", str(self.port)]
        self.files = []
        self.made_dir = False
        self.control = None
        if self.package:
            self.what = "imageserver package"
            if os.path.basename(path) == "imageserver" and not os.path.isdir(os.path.join(path, "imageserver")):
                path = os.path.dirname(path)
            if not os.path.isfile(os.path.join(path, "imageserver", "__main__.py")):
                raise RuntimeError(f"{path}: no imageserver/__main__.py (BENCH_PYTHON_SERVER names the "
                                   "imageserver package, the directory holding it, or image_server.py)")
            env = dict(os.environ, PYTHONPATH=path)
            usage = run([self.PYTHON, "-m", "imageserver", "--help"], cwd=path, env=env).stdout
            if tls and "--tls-enabled" not in usage:
                raise RuntimeError(f"{path}/imageserver takes no --tls-enabled: no HTTPS rows with it")
            if "--control-socket" in usage:
                self.control = os.path.join(os.path.dirname(logfile), f"imageserver-{self.port}.sock")
                listen += ["--control-socket", self.control]
            else:
                self.control = self.CONTROL_SOCKET
                if self.control_answers():
                    raise RuntimeError(f"another image server holds {self.control} (this imageserver "
                                       "takes no --control-socket): stop it to bench the package")
            cmd, kw = [self.PYTHON, "-m", "imageserver", *listen, *tls], {"cwd": path, "env": env}
        else:
            self.what = "image_server.py"
            if tls:
                raise RuntimeError("image_server.py serves plain HTTP only: no HTTPS rows with it")
            cmd, kw = [self.PYTHON, path, *listen], {}
            self.made_dir = not os.path.isdir(self.CFG_DIR)
            os.makedirs(self.CFG_DIR, exist_ok=True)
        self.scheme = "https" if tls else "http"
        self.path = path
        super().__init__(cmd, stdout=subprocess.DEVNULL, stderr=open(logfile, "w"), **kw)
        deadline = time.time() + 20
        while not self.ready():
            if time.time() > deadline or self.p.poll() is not None:
                raise RuntimeError(f"{path} did not start; see {logfile}")
            time.sleep(0.05)

    def control_send(self, msg):
        """One request on the control socket: its JSON answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.control)
            s.sendall((json.dumps(msg) + "\n").encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return json.loads(data)

    def control_answers(self):
        try:
            return self.control_send({"action": "status"}).get("status") == "ok"
        except (OSError, ValueError):  # not there (yet), or no JSON answer
            return False

    def ready(self):
        if self.package and not self.control_answers():
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def versions(self):
        """Which server, Python and libnbd (for the results)."""
        py = run([self.PYTHON, "-c", "import platform, nbd; "
                  "print(platform.python_version(), nbd.NBD().get_version())"]).stdout.split()
        return f"{self.what} ({self.path}), Python {py[0]}, libnbd {py[1]} (python3-libnbd)"

    def add_nbd(self, nbd):
        """The transfer id of a new transfer of `nbd`."""
        tid = f"csis-bench-{os.getpid()}-{self.port}-{len(self.files)}"
        cfg = {"backend": "nbd", "socket": nbd.sock}
        if self.package:
            # No idle expiry during the bench (the package's default is 600 s).
            answer = self.control_send({"action": "register", "transfer_id": tid,
                                        "config": dict(cfg, idle_timeout_seconds=86400)})
            if answer.get("status") != "ok":
                raise RuntimeError(f"imageserver refused the transfer: {answer}")
            self.files.append(tid)
            return tid
        path = os.path.join(self.CFG_DIR, tid)
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.files.append(path)
        return tid

    def url(self, tid):
        return f"{self.scheme}://127.0.0.1:{self.port}/images/{tid}"

    def stop(self):
        super().stop()
        if self.package:
            # The server leaves its control socket behind.
            try:
                os.unlink(self.control)
            except FileNotFoundError:
                pass
            return
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.made_dir:
            try:
                os.rmdir(self.CFG_DIR)
            except OSError:
                pass


UNTUNED = " (qemu-nbd untuned)"
PYTHON = "python: "
PYTHON_HTTPS = "python https: "
# The transfers the Python server is benched on; image_server.py (the old
# script) has no RANGED_PUT: its PUT takes no Content-Range.
RANGED_PUT = "PUT ×4 ranged (imageio workers)"
PYTHON_ROWS = ("curl GET (1 stream)", "curl GET ×4 ranged", "curl -T PUT", RANGED_PUT)


def reference(name):
    """The nbdcopy run a transfer is compared with (None for nbdcopy's own)."""
    if name.startswith("nbdcopy"):
        return None
    if name.endswith(UNTUNED):
        return "nbdcopy --no-extents → null:" + UNTUNED
    if "PUT" in name:
        return "nbdcopy FILE → nbd"
    return "nbdcopy --no-extents → null:"


HTTPS = "https: "
FLOOR_HTTPS = "floor https: "


def floor_row(name):
    """The floor's run of the same transfer, over HTTPS for an HTTPS row
    (None if it has none)."""
    https = name.startswith(HTTPS)
    row = {
        "curl GET (1 stream)": "curl GET (1 stream)",
        "curl GET ×4 ranged": "curl GET ×4 ranged",
        "curl -T PUT": "curl -T PUT",
        "PUT ×4 ranged (imageio workers)": "PUT ×4 ranged",
    }.get(name[len(HTTPS):] if https else name)
    return row and (FLOOR_HTTPS if https else "floor: ") + row


def http_row(name):
    """The plain HTTP row of an HTTPS row (server or floor), else None."""
    if name.startswith(HTTPS):
        return name[len(HTTPS):]
    if name.startswith(FLOOR_HTTPS):
        return "floor: " + name[len(FLOOR_HTTPS):]
    return None


def cipher_costs(floor_binary):
    """What the AEADs cost on this machine, s/GiB on one core: the crypto
    provider's own as rustls uses it (bench-floor --cipher-cost; "seal" and
    "open" per suite) and OpenSSL's (`openssl speed -evp`, 16 KiB blocks:
    the clients' library). {(library, suite, op): s/GiB}."""
    costs = {}
    for line in run([floor_binary, "--cipher-cost"]).stdout.splitlines():
        suite, op, secs = line.split()[:3]
        costs[("provider", suite, op)] = float(secs)
    for suite, evp in (("AES_256_GCM", "aes-256-gcm"), ("AES_128_GCM", "aes-128-gcm"),
                       ("CHACHA20_POLY1305", "chacha20-poly1305")):
        out = run(["openssl", "speed", "-evp", evp, "-bytes", "16384", "-seconds", "2"]).stdout
        kbytes = float(out.strip().splitlines()[-1].split()[-1].rstrip("k"))
        costs[("openssl", suite, "seal")] = GIB / (kbytes * 1000)
    return costs


def negotiated(url):
    """The TLS version and cipher suite curl and Python's ssl (imageio's
    client) negotiate with the server at `url`."""
    out = subprocess.run(["curl", "-sS", "-v", "-o", "/dev/null", *curl_tls(url), "-r", "0-0", url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stderr
    m = re.search(r"SSL connection using (\S+) / (\S+)", out)
    curl = f"{m.group(1)} {m.group(2)}" if m else "?"
    u = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context(cafile=CA_FILE)
    with socket.create_connection((u.hostname, u.port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=u.hostname) as s:
        name, version, _ = s.cipher()
    return curl, f"{version} {name}"


def bench(binary, floor_binary, tmp, procs):
    cores = os.cpu_count()
    load0 = os.getloadavg()
    log(f"{cores} cores, load average {load0[0]:.2f}; server {binary}")
    started = time.time()
    data, image = make_data(tmp)
    big = os.path.join(tmp, "big.qcow2")
    frag = os.path.join(tmp, "frag.qcow2")
    log("building the 1 TiB sparse and the fragmented qcow2 images")
    make_qcow2(big, 1024 * GIB, "b0", [(0, MIB), (512 * GIB, MIB), (1024 * GIB - MIB, MIB)])
    # 4 KiB in every other 64 KiB cluster of 1 GiB: 8192 data + 8192 holes.
    make_qcow2(frag, GIB, "b0", [(i * 128 * 1024, 4096) for i in range(8192)])

    config_dir = os.path.join(tmp, "config")
    os.mkdir(config_dir)
    nbd = QemuNbd(image, os.path.join(tmp, "raw.sock"), "raw")
    procs.append(nbd)
    # The same image served by a qemu-nbd without QEMU_NBD_TUNING (reads only).
    nbd_untuned = QemuNbd(image, os.path.join(tmp, "raw-untuned.sock"), "raw", tuned=False)
    procs.append(nbd_untuned)
    nbd_big = QemuNbd(big, os.path.join(tmp, "big.sock"), "qcow2", "b0")
    procs.append(nbd_big)
    nbd_frag = QemuNbd(frag, os.path.join(tmp, "frag.sock"), "qcow2", "b0")
    procs.append(nbd_frag)
    server = Server(binary, config_dir, os.path.join(tmp, "server.log"))
    procs.append(server)
    server.add_nbd("raw", nbd)
    server.add_nbd("raw-untuned", nbd_untuned)
    server.add_nbd("big", nbd_big, "b0")
    server.add_nbd("frag", nbd_frag, "b0")
    url = server.url("raw")
    floor = None
    if floor_binary:
        floor = Floor(floor_binary, nbd)
        procs.append(floor)
    # The HTTPS rows: the same binary and floor with TLS on (BENCH_TLS=0
    # leaves them out), a certificate of the bench's own.
    server_tls = floor_tls = None
    if os.environ.get("BENCH_TLS", "1") != "0" and shutil.which("openssl"):
        tls_dir = os.path.join(tmp, "tls")
        os.mkdir(tls_dir)
        tls = make_cert(tls_dir)
        os.mkdir(os.path.join(tls_dir, "config"))
        server_tls = Server(binary, os.path.join(tls_dir, "config"), os.path.join(tmp, "server-https.log"), tls)
        procs.append(server_tls)
        server_tls.add_nbd("raw", nbd)
        if floor_binary:
            floor_tls = Floor(floor_binary, nbd, tls)
            procs.append(floor_tls)
    # CloudStack's Python server on the same export (BENCH_PYTHON_SERVER);
    # the imageserver package over HTTPS too, with the same certificate.
    pythons = {}
    if os.environ.get("BENCH_PYTHON_SERVER"):
        python = PythonServer(os.environ["BENCH_PYTHON_SERVER"], os.path.join(tmp, "python.log"))
        procs.append(python)
        pythons[PYTHON] = python
        if server_tls and python.package:
            python_tls = PythonServer(os.environ["BENCH_PYTHON_SERVER"], os.path.join(tmp, "python-https.log"), tls)
            procs.append(python_tls)
            pythons[PYTHON_HTTPS] = python_tls
        purls = {prefix: p.url(p.add_nbd(nbd)) for prefix, p in pythons.items()}
        for purl in purls.values():
            run(curl_get(purl, "0-4095"))  # it serves the export

    log("warming the page cache")
    run(["nbdcopy", "--no-extents", nbd.uri, "null:"])
    run(curl_get(url))
    run(curl_get(server.url("raw-untuned")))

    def par_cmds(u, n=4):
        return [curl_get(u, f"{off}-{off + ln - 1}") for off, ln in parts(IMAGE_SIZE, n)]

    def curl_put(u):
        return globals()["curl_put"](u, data)

    tests = {
        "nbdcopy --no-extents → null:": (IMAGE_SIZE, call(["nbdcopy", "--no-extents", nbd.uri, "null:"])),
        "curl GET (1 stream)": (IMAGE_SIZE, call(curl_get(url))),
        "nbdcopy → null: (skips holes)": (IMAGE_SIZE, call(["nbdcopy", nbd.uri, "null:"])),
        "curl GET ×4 ranged": (IMAGE_SIZE, lambda: parallel(par_cmds(url))),
        "nbdcopy FILE → nbd": (DATA_SIZE, call(["nbdcopy", data, nbd.uri])),
        "curl -T PUT": (DATA_SIZE, call(curl_put(url))),
        "PUT ×4 ranged (imageio workers)": (DATA_SIZE, lambda: parallel([], put_ranges(url, data, 4))),
        "nbdcopy --no-extents → null:" + UNTUNED:
            (IMAGE_SIZE, call(["nbdcopy", "--no-extents", nbd_untuned.uri, "null:"])),
        "curl GET (1 stream)" + UNTUNED: (IMAGE_SIZE, call(curl_get(server.url("raw-untuned")))),
    }
    if floor:
        furl = floor.url("raw")
        tests.update({
            "floor: curl GET (1 stream)": (IMAGE_SIZE, call(curl_get(furl))),
            "floor: curl GET ×4 ranged": (IMAGE_SIZE, lambda: parallel(par_cmds(furl))),
            "floor: curl -T PUT": (DATA_SIZE, call(curl_put(furl))),
            "floor: PUT ×4 ranged": (DATA_SIZE, lambda: parallel([], put_ranges(furl, data, 4))),
        })
    if server_tls:
        surl = server_tls.url("raw")
        run(curl_get(surl))
        tests.update({
            HTTPS + "curl GET (1 stream)": (IMAGE_SIZE, call(curl_get(surl))),
            HTTPS + "curl GET ×4 ranged": (IMAGE_SIZE, lambda: parallel(par_cmds(surl))),
            HTTPS + "curl -T PUT": (DATA_SIZE, call(curl_put(surl))),
            HTTPS + "PUT ×4 ranged (imageio workers)": (DATA_SIZE, lambda: parallel([], put_ranges(surl, data, 4))),
        })
    if floor_tls:
        ftls = floor_tls.url("raw")
        tests.update({
            FLOOR_HTTPS + "curl GET (1 stream)": (IMAGE_SIZE, call(curl_get(ftls))),
            FLOOR_HTTPS + "curl GET ×4 ranged": (IMAGE_SIZE, lambda: parallel(par_cmds(ftls))),
            FLOOR_HTTPS + "curl -T PUT": (DATA_SIZE, call(curl_put(ftls))),
            FLOOR_HTTPS + "PUT ×4 ranged": (DATA_SIZE, lambda: parallel([], put_ranges(ftls, data, 4))),
        })
    for prefix, python in pythons.items():
        purl = purls[prefix]
        tests.update({
            prefix + "curl GET (1 stream)": (IMAGE_SIZE, call(curl_get(purl))),
            prefix + "curl GET ×4 ranged": (IMAGE_SIZE, lambda u=purl: parallel(par_cmds(u))),
            prefix + "curl -T PUT": (DATA_SIZE, call(curl_put(purl))),
        })
        if python.package:
            tests[prefix + RANGED_PUT] = (DATA_SIZE, lambda u=purl: parallel([], put_ranges(u, data, 4)))
    ratios = {k: [] for k in tests}
    faults = {k: [] for k in tests}
    cpus = {k: [] for k in tests}  # [server, qemu-nbd, client] CPU s per round
    best = {}
    rss_peak = 0
    for r in range(ROUNDS):
        log(f"round {r + 1}/{ROUNDS}")
        times = {}
        for name, (size, fn) in tests.items():
            pid = (floor_tls.pid if name.startswith(FLOOR_HTTPS)
                   else floor.pid if name.startswith("floor")
                   else server_tls.pid if name.startswith(HTTPS)
                   else pythons[PYTHON_HTTPS].pid if name.startswith(PYTHON_HTTPS)
                   else pythons[PYTHON].pid if name.startswith(PYTHON) else server.pid)
            nbd_pid = nbd_untuned.pid if name.endswith(UNTUNED) else nbd.pid
            if name == "curl GET ×4 ranged":
                with RssPoller(server.pid) as poll:
                    dt, cpu, flt = measure(fn, pid, nbd_pid)
                rss_peak = max(rss_peak, poll.peak)
            else:
                dt, cpu, flt = measure(fn, pid, nbd_pid)
            times[name] = dt
            faults[name].append(flt)
            cpus[name].append(cpu)
            if name not in best or dt < best[name][0]:
                best[name] = (dt, cpu)
        for name in tests:
            ref = reference(name)
            if ref:
                ratios[name].append(times[ref] / times[name] * tests[name][0] / tests[ref][0])

    costs = suites = None
    if server_tls:
        log("cipher costs; what curl and Python's ssl negotiate")
        costs = cipher_costs(floor_binary) if floor_binary else {}
        suites = negotiated(server_tls.url("raw"))

    log("peak RSS with 8 readers and 4 writers at once")
    with RssPoller(server.pid) as poll:
        parallel(par_cmds(url, 8), put_ranges(url, data, 4))
    busy_rss = poll.peak
    hwm = status_kib(server.pid, "VmHWM")

    log("extents")
    ext = {
        "1 TiB sparse qcow2, zero": extents_latency(server, "big"),
        "1 TiB sparse qcow2, dirty": extents_latency(server, "big", "?context=dirty"),
        "fragmented 1 GiB qcow2, zero": extents_latency(server, "frag"),
        "fragmented 1 GiB qcow2, dirty": extents_latency(server, "frag", "?context=dirty"),
    }

    log("small requests (wrk)")
    wrk(url, 1, 1)  # warm the connection pool
    small = {}
    for c in (1, 4):
        cpu0 = cpu_seconds(server.pid)
        rps, lat, requests = wrk(url, c, 5)
        small[c] = (rps, lat, (cpu_seconds(server.pid) - cpu0) / requests)

    load1 = os.getloadavg()
    elapsed = time.time() - started

    def mibs(name):
        size = tests[name][0]
        return size / MIB / best[name][0]

    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- cores: {cores}; load average before/after: {load0[0]:.2f} / {load1[0]:.2f}")
    print(f"- qemu-nbd: {run(['qemu-nbd', '--version']).stdout.splitlines()[0]}; "
          f"{run(['nbdcopy', '--version']).stdout.splitlines()[0]}")
    if pythons:
        print(f"- python: {pythons[PYTHON].versions()}")
    print(f"- best of {ROUNDS} interleaved rounds; bench took {elapsed:.0f} s")
    print()
    print("| transfer | bytes | best s | MiB/s | server CPU s | qemu-nbd CPU s | client CPU s "
          "| ratio, median of rounds | qemu-nbd minor faults, median |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (size, _) in tests.items():
        dt, cpu = best[name]
        med = f"{statistics.median(ratios[name]):.2f}" if ratios[name] else ""
        print(f"| {name} | {size} | {dt:.3f} | {mibs(name):.0f} | {cpu[0]:.2f} | {cpu[1]:.2f} "
              f"| {cpu[2]:.2f} | {med} | {statistics.median(faults[name]):.0f} |")
    print()
    print_cpu_per_gib(tests, cpus)
    if server_tls:
        print_tls(tests, cpus, costs, suites)
    print_python_ratios(tests, cpus, pythons)
    print()
    print("| extents | count | best ms | median ms | server CPU ms per call |")
    print("|---|---:|---:|---:|---:|")
    for name, (b, med, count, cpu) in ext.items():
        print(f"| {name} | {count} | {b * 1000:.1f} | {med * 1000:.1f} | {cpu * 1000:.1f} |")
    print()
    print("| 4 KiB ranged GET, keep-alive (wrk) | requests/s | mean latency ms | server CPU ms per request |")
    print("|---|---:|---:|---:|")
    for c, (rps, lat, cpu) in small.items():
        print(f"| {c} connection{'s' if c > 1 else ''} | {rps:.0f} | {lat:.3f} | {cpu * 1000:.3f} |")
    print()
    print(f"- server peak RSS during 4 parallel downloads: {rss_peak / 1024:.1f} MiB "
          f"(VmHWM over the whole run {hwm / 1024:.1f} MiB)")
    base = mibs("nbdcopy --no-extents → null:")
    print(f"- server peak RSS with 8 readers and 4 writers busy at once: {busy_rss / 1024:.1f} MiB "
          f"(target < 100 MiB)")
    print(f"- download_ratio = {mibs('curl GET (1 stream)') / base:.2f}")
    print(f"- parallel_download_ratio = {mibs('curl GET ×4 ranged') / base:.2f}")
    print(f"- upload_ratio = {mibs('curl -T PUT') / mibs('nbdcopy FILE → nbd'):.2f}")
    print(f"- parallel_upload_ratio = {mibs('PUT ×4 ranged (imageio workers)') / mibs('nbdcopy FILE → nbd'):.2f}")
    if floor:
        print(f"- floor (bench/floor.rs, no HTTP framework): download "
              f"{mibs('floor: curl GET (1 stream)') / base:.2f}, parallel "
              f"{mibs('floor: curl GET ×4 ranged') / base:.2f}, upload "
              f"{mibs('floor: curl -T PUT') / mibs('nbdcopy FILE → nbd'):.2f}")
    imageio_rows(binary, tmp, data, image, procs)


def imageio_venv_python():
    """The imageio client's interpreter (see the module doc), or None."""
    venv = os.environ.get("BENCH_IMAGEIO_VENV") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(__file__), "..", "target"),
        "imageio-venv")
    python = os.path.join(venv, "bin", "python")
    return python if os.access(python, os.X_OK) else None


# One imageio client run: download or upload with 4 workers (its default and
# what the server advertises), in its own process like a real client.
IMAGEIO_CLIENT = """
import logging
import sys
from ovirt_imageio import client
op, url, path, cafile = sys.argv[1:5]
# The client says on stderr when it switches to the server's Unix socket.
logging.basicConfig(level=logging.DEBUG if len(sys.argv) > 5 else logging.WARNING)
cafile = cafile or None
if op == "download":
    client.download(url, path, cafile, fmt="raw", max_workers=4)
else:
    client.upload(path, url, cafile, max_workers=4)
"""


def imageio_rows(binary, tmp, data, image, procs):
    """ovirt-imageio's client downloading the image and uploading the data
    file over loopback HTTPS and HTTP, and through the server's HTTP Unix
    socket beside each (the client, given the TCP URL, switches to the
    socket OPTIONS advertises; its first connection, OPTIONS only, is TCP,
    with the TLS handshake where there is TLS). Its own qemu-nbd and
    servers; prints its table."""
    python = imageio_venv_python()
    missing = None if python else "no imageio virtualenv (`make test-clients` makes it, or set BENCH_IMAGEIO_VENV)"
    if not shutil.which("openssl"):
        missing = "no openssl (for the HTTPS rows' certificate)"
    if missing:
        log(f"imageio rows skipped: {missing}")
        print(f"\n- imageio rows skipped: {missing}")
        return
    log("imageio client rows: HTTPS, HTTP, Unix socket beside each")
    work = os.path.join(tmp, "imageio")
    os.mkdir(work)
    cfg = os.path.join(work, "config")
    os.mkdir(cfg)
    tls = make_cert(work)
    cert = tls[2]
    nbd = QemuNbd(image, os.path.join(work, "nbd.sock"), "raw")
    procs.append(nbd)

    def start(name, args):
        return Server(binary, cfg, os.path.join(work, name + ".log"), args)

    def unix(name):
        return ["--unix-socket", os.path.join(work, name + ".sock")]

    servers = {
        "HTTPS, loopback": (start("https", tls), cert),
        "Unix socket (TCP on HTTPS)": (start("https-unix", tls + unix("https-unix")), cert),
        "HTTP, loopback": (start("http", []), ""),
        "Unix socket (TCP on HTTP)": (start("http-unix", unix("http-unix")), ""),
    }
    for server, _ in servers.values():
        procs.append(server)
    servers["HTTPS, loopback"][0].add_nbd("raw", nbd)
    # The client's own qemu-nbd opens local images with O_DIRECT where it
    # can: keep its side in memory (tmpfs), so that the disk is not measured.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * IMAGE_SIZE else work
    local = tempfile.mkdtemp(prefix="csis-bench-imageio-", dir=shm)
    try:
        src = os.path.join(local, "upload.raw")
        shutil.copyfile(data, src)
        out = os.path.join(local, "download.raw")

        def client(op, url, path, cafile, debug=()):
            def go():
                if op == "download" and os.path.exists(out):
                    os.unlink(out)
                return run([python, "-c", IMAGEIO_CLIENT, op, url, path, cafile, *debug]).stderr
            return go

        rows = {}
        for name, (server, cafile) in servers.items():
            url = server.url("raw")
            for op, size, path in (("download", IMAGE_SIZE, out), ("upload", DATA_SIZE, src)):
                # A first, unmeasured run warms the caches and shows which
                # way the client went.
                said = client(op, url, path, cafile, ["debug"])()
                switched = "Connecting to unix socket" in said
                if switched != ("Unix" in name):
                    raise RuntimeError(f"imageio {op} to {url}: switched to a Unix socket: {switched}")
                rows[f"imageio {op}, {name}"] = (size, server.pid, client(op, url, path, cafile))
        best = {}
        for r in range(ROUNDS):
            log(f"imageio round {r + 1}/{ROUNDS}")
            for name, (size, pid, fn) in rows.items():
                dt, cpu, _ = measure(fn, pid, nbd.pid)
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, cpu)
    finally:
        shutil.rmtree(local, ignore_errors=True)

    print()
    print("| imageio client, 4 workers (process start included) | bytes | best s | MiB/s "
          "| server CPU s | qemu-nbd CPU s | client CPU s (incl. its qemu-nbd) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (size, _, _) in rows.items():
        dt, cpu = best[name]
        print(f"| {name} | {size} | {dt:.3f} | {size / MIB / dt:.0f} | {cpu[0]:.2f} | {cpu[1]:.2f} | {cpu[2]:.2f} |")
    print()
    for op in ("download", "upload"):
        def t(name):
            return best[f"imageio {op}, {name}"][0]
        print(f"- unix_vs_https_{op} = "
              f"{t('HTTPS, loopback') / t('Unix socket (TCP on HTTPS)'):.2f} (target ≥ 1.5); "
              f"unix_vs_http_{op} = {t('HTTP, loopback') / t('Unix socket (TCP on HTTP)'):.2f} "
              f"(target ≥ 1.0)")


def imageio_only():
    """BENCH_IMAGEIO_ONLY=1: just the imageio rows, on their own data."""
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="csis-bench-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    procs = []
    try:
        data, image = make_data(tmp)
        imageio_rows(binary, tmp, data, image, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_stats(tests, cpus):
    """(med, per_gib, ratio): the median of a list; a row's CPU s per GiB of
    process i (0 server, 1 qemu-nbd, 2 client) per round; and the median over
    rounds of row a's server CPU per GiB divided by row b's."""
    def med(values):
        return statistics.median(values) if values else float("nan")

    def per_gib(name, i):
        size = tests[name][0]
        return [c[i] * GIB / size for c in cpus[name]]

    def ratio(a, b):
        return med([x / y for x, y in zip(per_gib(a, 0), per_gib(b, 0)) if y > 0])

    return med, per_gib, ratio


def print_python_ratios(tests, cpus, pythons):
    """Our server's CPU per GiB against the Python server's (BENCH_PYTHON_SERVER)
    on each transfer both served, over HTTP and over HTTPS, or how to get
    them: a table, then one line per transfer (the median of per-round
    ratios)."""
    if not pythons:
        log("python rows skipped: BENCH_PYTHON_SERVER unset")
        print("\n- python rows: set BENCH_PYTHON_SERVER to CloudStack's imageserver package "
              "(HTTP and HTTPS) or its old image_server.py (HTTP; both need python3-libnbd) "
              "to bench it in the same rounds")
        return
    med, per_gib, ratio = cpu_stats(tests, cpus)
    pairs = (("", PYTHON), (HTTPS, PYTHON_HTTPS))

    def cells(name, ours, python):
        if python + name not in tests or ours + name not in tests:
            return " | | "
        return (f" {med(per_gib(ours + name, 0)):.3f} | {med(per_gib(python + name, 0)):.3f} "
                f"| {ratio(ours + name, python + name):.2f} ")

    print()
    print("| server CPU s per GiB, median of rounds | ours http | python http | ours ÷ python http "
          "| ours https | python https | ours ÷ python https |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in PYTHON_ROWS:
        if PYTHON + name in tests:
            print(f"| {name} |{cells(name, '', PYTHON)}|{cells(name, HTTPS, PYTHON_HTTPS)}|")
    print()
    for ours, python in pairs:
        for name in PYTHON_ROWS:
            if python + name not in tests or ours + name not in tests:
                continue
            print(f"- {ours}server ÷ {python.rstrip(': ')} CPU per GiB, {name}: "
                  f"{ratio(ours + name, python + name):.2f} ({med(per_gib(ours + name, 0)):.3f} s "
                  f"against {med(per_gib(python + name, 0)):.3f} s; target < 1)")
    if not pythons[PYTHON].package:
        print("- python: PUT ×4 ranged not run: image_server.py's PUT refuses Content-Range "
              "and it takes one writer at a time; no HTTPS rows: it serves plain HTTP only")
    elif PYTHON_HTTPS not in pythons:
        print("- python https rows not run: BENCH_TLS=0 or no openssl")


def suite_of(negotiated_name):
    """The AEAD of a negotiated suite's name (TLS_AES_256_GCM_SHA384 →
    AES_256_GCM), as cipher_costs names it."""
    for suite in ("AES_256_GCM", "AES_128_GCM", "CHACHA20_POLY1305"):
        if suite in negotiated_name:
            return suite
    return None


def print_tls(tests, cpus, costs, suites):
    """The HTTPS rows against the HTTPS floor and against the cipher: per
    transfer, server CPU per GiB over HTTP and HTTPS, the HTTPS floor's, the
    server's ÷ the HTTPS floor's (median of per-round ratios), and what TLS
    adds (HTTPS − HTTP, medians) for the server and the floor, ÷ the
    cipher's own cost (the provider's seal for a GET, open for a PUT, of
    the suite curl negotiates; one core)."""
    med, per_gib, ratio = cpu_stats(tests, cpus)
    curl, python = suites
    print()
    print(f"- negotiated: curl {curl}; Python ssl (imageio's client, the PUT ×4 threads) {python}")
    if costs:
        cells = "; ".join(f"{lib} {suite} {op} {v:.3f}" for (lib, suite, op), v in costs.items())
        print(f"- cipher cost, s/GiB on one core: {cells}")
    print()
    print("| HTTPS, CPU s per GiB, median of rounds | server http | server https | floor https "
          "| server https ÷ floor https | TLS adds, server | TLS adds, floor | cipher | server's TLS ÷ cipher "
          "| client https |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in tests:
        if not name.startswith(HTTPS):
            continue
        plain, fl = http_row(name), floor_row(name)
        srv, http = med(per_gib(name, 0)), med(per_gib(plain, 0))
        fl_cell = ratio_cell = fl_adds = ""
        if fl in tests:
            fl_cell = f"{med(per_gib(fl, 0)):.3f}"
            ratio_cell = f"{ratio(name, fl):.2f}"
            if http_row(fl) in tests:
                fl_adds = f"{med(per_gib(fl, 0)) - med(per_gib(http_row(fl), 0)):.3f}"
        suite = suite_of(curl if "curl" in name else python)
        cipher = (costs or {}).get(("provider", suite, "open" if "PUT" in name else "seal"))
        adds = srv - http
        print(f"| {name} | {http:.3f} | {srv:.3f} | {fl_cell} | {ratio_cell} | {adds:.3f} | {fl_adds} "
              f"| {cipher or float('nan'):.3f} | {adds / cipher if cipher else float('nan'):.2f} "
              f"| {med(per_gib(name, 2)):.3f} |")


def print_cpu_per_gib(tests, cpus):
    """CPU seconds per GiB moved, median of the rounds, per process; the
    server's beside the floor's for the same transfer (ratio per round,
    then the median). For nbdcopy rows the client is nbdcopy."""
    med, per_gib, ratio = cpu_stats(tests, cpus)
    print("| CPU s per GiB, median of rounds | server (floor rows: the floor) | floor | server ÷ floor "
          "| qemu-nbd | client |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in tests:
        srv = per_gib(name, 0)
        fl = floor_row(name)
        floor_cell = ratio_cell = ""
        if fl in tests:
            floor_cell = f"{med(per_gib(fl, 0)):.3f}"
            ratio_cell = f"{ratio(name, fl):.2f}"
        server_cell = "" if name.startswith("nbdcopy") else f"{med(srv):.3f}"
        print(f"| {name} | {server_cell} | {floor_cell} | {ratio_cell} "
              f"| {med(per_gib(name, 1)):.3f} | {med(per_gib(name, 2)):.3f} |")


if __name__ == "__main__":
    if os.environ.get("BENCH_IMAGEIO_ONLY") and len(sys.argv) > 1:
        imageio_only()
    else:
        main()
