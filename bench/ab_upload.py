#!/usr/bin/env python3
"""Interleaved A/B of uploads: server binaries against each other and the
floor on one qemu-nbd export (tuned as in bench.py), server CPU s per GiB.

Usage: bench/ab_upload.py FLOOR NAME=BINARY... (a NAME starting with
"floor" is another floor binary) (AB_ROUNDS, default 5;
AB_SIZE_MIB, default 1024; BENCH_TMP, default /var/tmp). Prints, per
transfer, the median over rounds of every binary's and the floor's CPU
per GiB and of its ratio to the floor's in the same round.
"""

import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

GIB = 1 << 30


def main():
    floor_bin, named = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    rounds = int(os.environ.get("AB_ROUNDS", "5"))
    size = int(os.environ.get("AB_SIZE_MIB", "1024")) << 20
    tmp = tempfile.mkdtemp(prefix="ab-upload-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    data = os.path.join(tmp, "data.bin")
    with open("/dev/urandom", "rb") as src, open(data, "wb") as dst:
        for _ in range(size >> 24):
            dst.write(src.read(1 << 24))
    image = os.path.join(tmp, "image.raw")
    open(image, "wb").close()
    os.truncate(image, size)
    nbd = bench.QemuNbd(image, os.path.join(tmp, "nbd.sock"), "raw")
    procs = [nbd]
    try:
        targets = []
        for name, binary in named:
            if name.startswith("floor"):
                f = bench.Floor(binary, nbd)
                procs.append(f)
                targets.append((name, f.pid, f.url("t")))
                continue
            cfg = os.path.join(tmp, f"cfg-{name}")
            os.mkdir(cfg)
            s = bench.Server(binary, cfg, os.path.join(tmp, f"{name}.log"))
            s.add_nbd("t", nbd)
            procs.append(s)
            targets.append((name, s.pid, s.url("t")))
        floor = bench.Floor(floor_bin, nbd)
        procs.append(floor)
        targets.append(("floor", floor.pid, floor.url("t")))
        rows = {
            "curl -T": lambda u: bench.call(["curl", "-sS", "--fail", "-o", "/dev/null", "-T", data, u]),
            "PUT x4": lambda u: (lambda: bench.parallel([], bench.put_ranges(u, data, 4))),
        }
        cpu = {(r, n): [] for r in rows for n, _, _ in targets}
        for rnd in range(rounds):
            for row, make in rows.items():
                for name, pid, url in targets:
                    dt, c, _ = bench.measure(make(url), pid, nbd.pid)
                    cpu[(row, name)].append(c[0] * GIB / size)
                    bench.log(f"round {rnd} {row} {name}: {dt:.3f} s, server {c[0]:.2f} qemu-nbd {c[1]:.2f} client {c[2]:.2f}")
        for row in rows:
            fl = cpu[(row, "floor")]
            for name, _, _ in targets:
                v = cpu[(row, name)]
                ratio = statistics.median(a / b for a, b in zip(v, fl))
                print(f"{row:8} {name:8} {statistics.median(v):.3f} s/GiB  ÷floor {ratio:.2f}  {[round(x, 2) for x in v]}")
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
