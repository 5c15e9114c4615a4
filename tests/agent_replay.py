#!/usr/bin/env python3
"""The CloudStack KVM agent's life cycle of the image server, replayed
against the INSTALLED package (run by tests/packaging.sh, as root, with the
python of the ovirt-imageio virtualenv).

What the agent does (apache/cloudstack, LibvirtComputingResource.configure,
LibvirtCreateImageTransferCommandWrapper, LibvirtFinalizeImageTransferCommandWrapper,
ImageServerControlSocket) and what this script does in its place:

- configure(): `Script.findScript("scripts/vm/hypervisor/kvm",
  "imageserver/__main__.py")`. find_script() below walks the same
  directories in the same order, for an agent whose classpath holds no
  `imageserver/` (the packaged one) and whose Script.class is in a jar in
  /usr/share/cloudstack-agent/lib: up from
  /usr/share/cloudstack-agent/lib/scripts/vm/hypervisor/kvm, then up from
  environment.properties' paths.script, /usr/share/cloudstack-common/scripts/...
- create: `systemd-run --unit=cloudstack-image-server --property=Restart=no
  --property=WorkingDirectory=<parent of that imageserver/> /usr/bin/python3
  -m imageserver --listen ADDR --port 54322 --tls-enabled --tls-cert-file
  cloud.crt --tls-key-file cloud.key`. Here: the same command and working
  directory, started by this script with the environment systemd gives a
  service (PATH only), on loopback and --port 0 (the port is printed). What
  systemd-run itself checks, that no unit file is named
  cloudstack-image-server.service, tests/packaging.sh checks.
- then `{"action":"status"}` through `echo '...' | socat -t5 -
  UNIX-CONNECT:/var/run/cloudstack/image-server.sock` once a second, up to
  10 s, and `register` with the agent's payload: through a client that
  writes one line, half-closes and reads up to the first newline within 5 s
  (the newer agent's Java client) and through socat -t5 (older agents).
- the backup product: ovirt-imageio's client downloads one transfer and
  uploads to the other over HTTPS, trusting only the CA.
- finalize: `unregister`; at `active_transfers` 0, `systemctl stop`, which
  sends SIGTERM: the server must exit 0.
- all of it twice: the agent starts the server again for the next backup.

The certificate and key are made as CloudStack's keystore-cert-import
leaves them: cloud.crt the host certificate followed by its CA chain,
cloud.key from `openssl pkcs12 ... -nodes -nocerts | openssl rsa` (PKCS#8
with OpenSSL 3; OpenSSL 1.1 wrote PKCS#1 "RSA PRIVATE KEY", the second
cycle's form).

Prints "ok - ..." / "not ok - ..." lines; exits 1 if any check failed.
`agent_replay.py --find` prints only where findScript finds imageserver.
"""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

from ovirt_imageio import client

AGENT_LIB = "/usr/share/cloudstack-agent/lib"
COMMON = "/usr/share/cloudstack-common"
KVM_SCRIPTS_DIR = "scripts/vm/hypervisor/kvm"
SHIM_DIR = AGENT_LIB + "/" + KVM_SCRIPTS_DIR + "/imageserver"
CONTROL = "/var/run/cloudstack/image-server.sock"
HTTP_SOCKET = "/var/run/cloudstack/image-server-http.sock"
ENV_FILE = "/etc/default/cloudstack-image-server"
SYSTEMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
SIZE = 8 << 20
TIMEOUT = 60

failed = 0


def check(name, fn):
    global failed
    try:
        fn()
        print("ok - " + name, flush=True)
    except Exception:  # noqa: BLE001 -- every failure is reported, then counted
        failed += 1
        print("not ok - " + name, flush=True)
        for line in traceback.format_exc().splitlines():
            print("#   " + line, flush=True)


def run(*cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=TIMEOUT, check=False, **kw)
    if p.returncode != 0:
        raise RuntimeError("{} exited {}: {}".format(
            cmd, p.returncode, p.stdout.decode(errors="replace")))
    return p.stdout.decode()


def find_script(path, script):
    """Script.findScript(path, script) for a relative path (see the module
    docstring): the first existing candidate, walking each base up."""
    for base in (AGENT_LIB, COMMON):
        search = base + "/" + path + "/"
        while True:
            search = search[:search.rindex("/")]
            candidate = search + "/" + script
            if os.path.exists(candidate) or "/" not in search:
                break
        if os.path.exists(candidate):
            return candidate
    return None


def java_style(request):
    """The newer agent's client: one line, half-close, read to the newline."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(CONTROL)
        s.sendall(json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf.split(b"\n")[0])


def socat(request):
    """The older agent's client, the same shell command."""
    line = json.dumps(request).replace("'", "'\\''")
    out = run("/bin/bash", "-c", "echo '{}' | socat -t5 - UNIX-CONNECT:{}".format(line, CONTROL))
    return json.loads(out.strip())


def expect(got, want):
    if got != want:
        raise AssertionError("got {!r}, want {!r}".format(got, want))


class QemuNbd:
    def __init__(self, image, sock, export, bitmap=None, read_only=False):
        if os.path.exists(sock):
            os.unlink(sock)
        cmd = ["qemu-nbd", "--socket=" + sock, "--persistent", "--shared=0",
               "--cache=writeback", "-x", export, "-f", "qcow2"]
        if bitmap:
            cmd += ["-B", bitmap]
        if read_only:
            # A backup's export; also lets qemu-img read the image meanwhile.
            cmd.append("--read-only")
        self.proc = subprocess.Popen(cmd + [image], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-nbd exited: {}".format(cmd))
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(sock)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def make_ca_and_host_cert(work, pkcs1):
    """cloud.ca.crt, cloud.crt (host certificate + CA) and cloud.key."""
    ca_key, ca = work + "/ca.key", work + "/cloud.ca.crt"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=ca.cloudstack.test", "-keyout", ca_key, "-out", ca)
    host_key, csr, host = work + "/host.key", work + "/host.csr", work + "/host.crt"
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kvm-host",
        "-keyout", host_key, "-out", csr)
    ext = work + "/san.ext"
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
        "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", host)
    cert = work + "/cloud.crt"
    with open(cert, "w") as out:
        for part in (host, ca):
            with open(part) as f:
                out.write(f.read())
    # keystore-cert-import: into a PKCS#12 keystore, and the key back out.
    p12 = work + "/cloud.jks.p12"
    run("openssl", "pkcs12", "-export", "-name", "cloud", "-in", cert, "-inkey",
        host_key, "-out", p12, "-password", "pass:secret")
    key = work + "/cloud.key"
    pem = run("openssl", "pkcs12", "-in", p12, "-nodes", "-nocerts",
              "-password", "pass:secret")
    rsa = ["openssl", "rsa", "-out", key] + (["-traditional"] if pkcs1 else [])
    subprocess.run(rsa, input=pem.encode(), check=True, timeout=TIMEOUT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(key) as f:
        head = f.readline().strip()
    want = "-----BEGIN RSA PRIVATE KEY-----" if pkcs1 else "-----BEGIN PRIVATE KEY-----"
    expect(head, want)
    os.chmod(key, 0o600)
    return ca, cert, key


def make_source(path):
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 0 1M",
        "-c", "write -P 0x5c 3M 512k", "-c", "write -z 5M 1M",
        "-c", "write -P 0x01 8188k 4k", path)
    run("qemu-img", "bitmap", "--add", path, "ckp-1")


def cmdline(pid):
    with open("/proc/{}/cmdline".format(pid), "rb") as f:
        return f.read().split(b"\0")[:-1]


def cycle(n, work, pkcs1, operator_args):
    """One create -> transfers -> finalize cycle; returns nothing, checks."""
    tag = "cycle {}: ".format(n)
    ca, cert, key = make_ca_and_host_cert(work, pkcs1)
    with open(ENV_FILE) as f:
        env_text = f.read()
    with open(ENV_FILE, "a") as f:
        f.write('CSIS_AGENT_ARGS="{}"\n'.format(" ".join(operator_args)))

    main = find_script(KVM_SCRIPTS_DIR, "imageserver/__main__.py")
    check(tag + "findScript finds our imageserver/__main__.py first",
          lambda: expect(main, SHIM_DIR + "/__main__.py"))
    package_dir = os.path.dirname(main)
    agent_args = ["--listen", "127.0.0.1", "--port", "0", "--tls-enabled",
                  "--tls-cert-file", cert, "--tls-key-file", key]
    log = open(work + "/server.log", "wb")
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-m", os.path.basename(package_dir)] + agent_args,
        cwd=os.path.dirname(package_dir), env=SYSTEMD_ENV,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    nbds = []
    try:
        ready = False
        for _ in range(10):
            try:
                ready = socat({"action": "status"}) == {"status": "ok", "active_transfers": 0}
            except (RuntimeError, ValueError):
                ready = False
            if ready:
                break
            time.sleep(1)
        check(tag + "status over socat -t5 answers ok within the agent's 10 s",
              lambda: expect(ready, True))
        if not ready:
            return
        base = None
        deadline = time.monotonic() + 10
        while base is None and time.monotonic() < deadline:
            for line in list(lines):
                text = line.decode().strip()
                if text.startswith("listening on https://"):
                    base = text[len("listening on "):]
            time.sleep(0.05)
        check(tag + "the server listens on HTTPS",
              lambda: expect(base is not None and base.startswith("https://127.0.0.1:"), True))
        argv = [a.decode() for a in cmdline(proc.pid)]
        check(tag + "python3 -m imageserver became the server (same pid), operator flags first",
              lambda: expect(argv, ["/usr/bin/cloudstack-image-server"] + operator_args + agent_args))

        src = work + "/src.qcow2"
        make_source(src)
        os.makedirs("/tmp/imagetransfer", exist_ok=True)
        sock_a = "/tmp/imagetransfer/csis-replay-{}-{}-a.sock".format(os.getpid(), n)
        sock_b = "/tmp/imagetransfer/csis-replay-{}-{}-b.sock".format(os.getpid(), n)
        nbds.append(QemuNbd(src, sock_a, "vda", bitmap="ckp-1", read_only=True))
        dst = work + "/dst.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(SIZE))
        nbds.append(QemuNbd(dst, sock_b, "vdb"))
        id_a, id_b = "replay-{}-a".format(n), "replay-{}-b".format(n)
        check(tag + "register (agent payload) through a Java-style half-closed client",
              lambda: expect(java_style({"action": "register", "transfer_id": id_a, "config": {
                  "backend": "nbd", "socket": sock_a, "export": "vda",
                  "export_bitmap": "ckp-1", "idle_timeout_seconds": 3600}}),
                  {"status": "ok", "active_transfers": 1}))
        check(tag + "register (agent payload) through socat -t5",
              lambda: expect(socat({"action": "register", "transfer_id": id_b, "config": {
                  "backend": "nbd", "socket": sock_b, "export": "vdb",
                  "idle_timeout_seconds": 3600}}),
                  {"status": "ok", "active_transfers": 2}))

        def options():
            ctx = ssl.create_default_context(cafile=ca)
            req = urllib.request.Request(base + "/images/" + id_b, method="OPTIONS")
            with urllib.request.urlopen(req, context=ctx, timeout=TIMEOUT) as r:
                got = json.load(r)
            unix = None if "--unix-socket=" in operator_args else HTTP_SOCKET
            expect(got, {"unix_socket": unix, "features": ["extents", "zero", "flush"],
                         "max_readers": 4, "max_writers": 4})
        check(tag + "OPTIONS over HTTPS, certificate chain verified against the CA alone",
              options)

        def download():
            out = work + "/download.qcow2"
            client.download(base + "/images/" + id_a, out, ca, fmt="qcow2", max_workers=4)
            out_text = run("qemu-img", "compare", src, out)
            expect("Images are identical" in out_text, True)
        check(tag + "ovirt-imageio client downloads over HTTPS, qemu-img compare", download)

        def upload():
            client.upload(src, base + "/images/" + id_b, ca, max_workers=4)
        check(tag + "ovirt-imageio client uploads over HTTPS", upload)

        check(tag + "unregister (Java-style) answers 1 left",
              lambda: expect(java_style({"action": "unregister", "transfer_id": id_a}),
                             {"status": "ok", "active_transfers": 1}))
        check(tag + "unregister of an unknown id answers ok with the count",
              lambda: expect(socat({"action": "unregister", "transfer_id": "never-registered"}),
                             {"status": "ok", "active_transfers": 1}))
        check(tag + "unregister (socat) answers 0: the agent stops the server",
              lambda: expect(socat({"action": "unregister", "transfer_id": id_b}),
                             {"status": "ok", "active_transfers": 0}))

        def uploaded():
            nbds[1].stop()
            out_text = run("qemu-img", "compare", src, dst)
            expect("Images are identical" in out_text, True)
        check(tag + "the upload is on disk after unregister, qemu-img compare", uploaded)

        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = "still running 60 s after SIGTERM"
        check(tag + "SIGTERM (systemctl stop) ends it with exit 0", lambda: expect(rc, 0))
        check(tag + "the control socket is gone after the stop",
              lambda: expect(os.path.exists(CONTROL), False))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        log.close()
        for nbd in nbds:
            nbd.stop()
        for s in ("a", "b"):
            path = "/tmp/imagetransfer/csis-replay-{}-{}-{}.sock".format(os.getpid(), n, s)
            if os.path.exists(path):
                os.unlink(path)
        with open(ENV_FILE, "w") as f:
            f.write(env_text)
        if failed:
            with open(work + "/server.log", "rb") as f:
                for line in f.read().decode(errors="replace").splitlines()[-20:]:
                    print("#   server: " + line)


def main():
    with tempfile.TemporaryDirectory(prefix="csis-agent-replay-") as work:
        os.makedirs(work + "/1")
        os.makedirs(work + "/2")
        # First backup: the agent's defaults (HTTP Unix socket on; the local
        # imageio client switches to it after OPTIONS over HTTPS), PKCS#8 key.
        cycle(1, work + "/1", pkcs1=False, operator_args=["--max-requests", "32"])
        # Next backup: the agent starts the server again. PKCS#1 key; the
        # operator turns the Unix socket off, so data goes over HTTPS too.
        cycle(2, work + "/2", pkcs1=True,
              operator_args=["--max-requests", "32", "--unix-socket="])
    print("agent replay: {}".format("failed" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--find"]:
        # Where the agent would find its image server now.
        print(find_script(KVM_SCRIPTS_DIR, "imageserver/__main__.py"))
        sys.exit(0)
    sys.exit(main())
