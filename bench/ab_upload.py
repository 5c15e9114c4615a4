#!/usr/bin/env python3
"""Interleaved A/B of transfers: server binaries against each other and the
floor on one qemu-nbd export (tuned as in bench.py), server CPU s per GiB.

Usage: bench/ab_upload.py FLOOR NAME=BINARY[,VAR=VALUE...]... (a NAME
starting with "floor" is another floor binary; VAR=VALUE pairs go into
that process's environment). AB_ROUNDS (default 5), AB_SIZE_MIB (default
1024), BENCH_TMP (default /var/tmp); AB_ROWS, a comma-separated subset of
"GET,GET x4,curl -T,PUT x4" (default "curl -T,PUT x4", the uploads);
AB_TLS=1 serves every binary and the floors over HTTPS (bench.make_cert's
certificate, curl and the upload threads trusting it). Prints, per
transfer, the median over rounds of every binary's and the floor's CPU
per GiB and of its ratio to the floor's in the same round, with the
clients' CPU per GiB beside it.
"""

import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

GIB = 1 << 30


def parse(arg):
    name, rest = arg.split("=", 1)
    binary, *env = rest.split(",")
    return name, binary, dict(e.split("=", 1) for e in env)


def main():
    floor_bin, named = sys.argv[1], [parse(a) for a in sys.argv[2:]]
    rounds = int(os.environ.get("AB_ROUNDS", "5"))
    size = int(os.environ.get("AB_SIZE_MIB", "1024")) << 20
    wanted = os.environ.get("AB_ROWS", "curl -T,PUT x4").split(",")
    tmp = tempfile.mkdtemp(prefix="ab-upload-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    tls = bench.make_cert(tmp) if os.environ.get("AB_TLS") == "1" else []
    data = os.path.join(tmp, "data.bin")
    with open("/dev/urandom", "rb") as src, open(data, "wb") as dst:
        for _ in range(size >> 24):
            dst.write(src.read(1 << 24))
    image = os.path.join(tmp, "image.raw")
    shutil.copyfile(data, image)  # GETs read random data, not a hole
    nbd = bench.QemuNbd(image, os.path.join(tmp, "nbd.sock"), "raw")
    procs = [nbd]
    try:
        targets = []
        for name, binary, env in named:
            if name.startswith("floor"):
                f = bench.Floor(binary, nbd, tls, env)
                procs.append(f)
                targets.append((name, f.pid, f.url("t")))
                continue
            cfg = os.path.join(tmp, f"cfg-{name}")
            os.mkdir(cfg)
            s = bench.Server(binary, cfg, os.path.join(tmp, f"{name}.log"), tls, env)
            s.add_nbd("t", nbd)
            procs.append(s)
            targets.append((name, s.pid, s.url("t")))
        floor = bench.Floor(floor_bin, nbd, tls)
        procs.append(floor)
        targets.append(("floor", floor.pid, floor.url("t")))

        def ranged(u):
            return [bench.curl_get(u, f"{off}-{off + ln - 1}") for off, ln in bench.parts(size, 4)]

        rows = {
            "GET": lambda u: bench.call(bench.curl_get(u)),
            "GET x4": lambda u: (lambda: bench.parallel(ranged(u))),
            "curl -T": lambda u: bench.call(bench.curl_put(u, data)),
            "PUT x4": lambda u: (lambda: bench.parallel([], bench.put_ranges(u, data, 4))),
        }
        rows = {k: v for k, v in rows.items() if k in wanted}
        for _, _, url in targets:  # warm every path once
            bench.run(bench.curl_get(url))
        cpu = {(r, n): [] for r in rows for n, _, _ in targets}
        client = {(r, n): [] for r in rows for n, _, _ in targets}
        for rnd in range(rounds):
            for row, make in rows.items():
                for name, pid, url in targets:
                    dt, c, _ = bench.measure(make(url), pid, nbd.pid)
                    cpu[(row, name)].append(c[0] * GIB / size)
                    client[(row, name)].append(c[2] * GIB / size)
                    bench.log(f"round {rnd} {row} {name}: {dt:.3f} s, server {c[0]:.2f} "
                              f"qemu-nbd {c[1]:.2f} client {c[2]:.2f}")
        print(f"# {'HTTPS' if tls else 'HTTP'}, {rounds} rounds, {size >> 20} MiB, shared machine")
        for row in rows:
            fl = cpu[(row, "floor")]
            for name, _, _ in targets:
                v = cpu[(row, name)]
                ratio = statistics.median(a / b for a, b in zip(v, fl))
                print(f"{row:8} {name:10} {statistics.median(v):.3f} s/GiB  ÷floor {ratio:.2f}  "
                      f"client {statistics.median(client[(row, name)]):.3f}  {[round(x, 2) for x in v]}")
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
