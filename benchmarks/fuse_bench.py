#!/usr/bin/env python3
"""fio through a ufs FUSE mount, beside the library API and the kernel's XFS/btrfs (issue 5).

    benchmarks/fuse_bench.py [--runtime S] [--rounds N] [--dir DIR] [--engines native,pyfuse3]
                             [--personalities xfslike,btrfslike] [--only NAME]
                             [--no-kernel] [--json F]

Workloads (``--only`` picks those whose name contains the text): 4 KiB random read and
write at QD1 and QD32 (``randread-4k-qd32`` carries the issue-5 target of >= 40,000 IOPS
through the mount), 1 MiB sequential write and read at QD8.  For each round and workload,
back to back on the same machine state:
- ``raw``: fio on a preallocated raw image (the device limit);
- ``engine``: the ufs DIO engine on that image, identity-mapped (benchmarks/engine.py: no
  personality, no FUSE);
- per personality P (xfslike against kernel XFS, btrfslike against kernel btrfs):
  ``kernel-xfs``/``kernel-btrfs``: fio on a file of the kernel filesystem (loop device,
  ``--direct-io=on``); ``P-library``: the same job through the public API in this process
  (benchmarks/fs.py's driver: ``submit_pwrite``/``reap`` under ``Filesystem.plug()``);
  ``P-ENGINE``: fio (``--direct=1 --ioengine=io_uring``) on a file of a P image mounted with
  ``ufs mount-image`` and that FUSE engine.
Printed: the median IOPS and MiB/s over the rounds with every round's value (the machine is
a shared VM: read them before trusting a row), and per FUSE row two ratios: ``/library``,
the FUSE overhead (the mount against the same personality without FUSE), and ``/kernel``,
against the kernel filesystem of the same shape.  Needs root, fio, /dev/fuse.  Every mount
is released in ``finally``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.engine import EngineTarget  # noqa: E402
from benchmarks.fio import (Workload, fio_run, have_fio, kernel_fs, machine_info,  # noqa: E402
                            preallocate)
from benchmarks.fs import PAIRS, UfsTarget  # noqa: E402

WORKLOADS = [
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("randwrite-4k-qd1", "randwrite", 4096, 1),
    Workload("write-1m-qd8", "write", 1 << 20, 8),
    Workload("read-1m-qd8", "read", 1 << 20, 8),
]
TARGET_IOPS = {"randread-4k-qd32": 40000}
FILE_SIZE = 256 << 20


def _ufs(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "ufs", *map(str, args)], capture_output=True,
                       text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"ufs {' '.join(map(str, args))}: {r.stdout}{r.stderr}")
    return r.stdout


class UfsMount:
    """A personality's image mounted through FUSE with one engine, holding a filled file."""

    def __init__(self, workdir: str, fstype: str, engine: str):
        self.image = os.path.join(workdir, f"ufs-{fstype}-{engine}.img")
        self.mp = tempfile.mkdtemp(prefix=f"ufs-fuse-{fstype}-{engine}-", dir=workdir)
        self.fstype = fstype
        self.engine = engine
        self.env = dict(os.environ)
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env["PYTHONPATH"] = top + (os.pathsep + self.env["PYTHONPATH"]
                                        if self.env.get("PYTHONPATH") else "")

    def __enter__(self):
        if os.path.exists(self.image):
            os.unlink(self.image)
        _ufs("mkfs", "-t", self.fstype, "-s", "1G", self.image, env=self.env)
        _ufs("mount-image", "-o", "fuse_native" if self.engine == "native" else "fuse_pyfuse3",
             self.image, self.mp, env=self.env)
        self.path = os.path.join(self.mp, "f")
        preallocate(self.path, FILE_SIZE)
        return self

    def __exit__(self, *exc):
        try:
            _ufs("umount", self.mp, env=self.env)
        finally:
            os.rmdir(self.mp)
            os.unlink(self.image)
        return False


def _library_run(fstype: str, workdir: str, works, runtime: float, record) -> None:
    """The same jobs through the public API on an image of its own (no FUSE)."""
    t = UfsTarget(fstype, os.path.join(workdir, f"ufs-{fstype}-library.img"), 1 << 30)
    try:
        t.prepare("/f", FILE_SIZE)
        for w in works:
            record(w, f"{fstype}-library", t.run(w, "/f", FILE_SIZE, runtime))
    finally:
        t.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: benchmarks/fuse_bench.py --runtime 3 --rounds 2 --only 4k")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per run (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), ".bench"), help="work directory")
    ap.add_argument("--engines", default="native",
                    help="FUSE engines to measure, comma-separated: native, pyfuse3 "
                         "(default native)")
    ap.add_argument("--personalities", default="xfslike,btrfslike",
                    help="personalities to mount (default xfslike,btrfslike)")
    ap.add_argument("--only", default=None, help="run workloads whose name contains this")
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel filesystems")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not have_fio():
        print("fio is not installed", file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    raw = os.path.join(args.dir, "raw.img")
    preallocate(raw, 1 << 30)
    engines = [e for e in args.engines.split(",") if e]
    personalities = [p for p in args.personalities.split(",") if p]
    for p in personalities:
        if p not in PAIRS:
            ap.error(f"unknown personality {p!r} (choose from {', '.join(PAIRS)})")
    works = [w for w in WORKLOADS if not args.only or args.only in w.name]
    print("# " + ", ".join(f"{k}={v}" for k, v in (machine_info() | {
        "runtime_s": args.runtime, "rounds": args.rounds, "file": FILE_SIZE}).items()))
    results: dict = {w.name: {} for w in works}

    def record(w, who, r):
        results[w.name].setdefault(who, []).append((r["iops"], r["mib_s"]))

    for _ in range(args.rounds):
        target = EngineTarget(raw)
        try:
            for w in works:
                record(w, "raw", fio_run(raw, w, 1 << 30, args.runtime))
                record(w, "engine", target.run(w, 1 << 30, args.runtime))
        finally:
            target.close()
        for pers in personalities:
            kfs = PAIRS[pers]
            if not args.no_kernel:
                with kernel_fs(kfs, 1 << 30, args.dir) as mnt:
                    f = os.path.join(mnt, "f")
                    preallocate(f, FILE_SIZE)
                    for w in works:
                        record(w, f"kernel-{kfs}", fio_run(f, w, FILE_SIZE, args.runtime))
            _library_run(pers, args.dir, works, args.runtime, record)
            for eng in engines:
                with UfsMount(args.dir, pers, eng) as m:
                    for w in works:
                        record(w, f"{pers}-{eng}", fio_run(m.path, w, FILE_SIZE, args.runtime))

    def med(vals, i):
        return statistics.median(v[i] for v in vals)

    rows = []
    print(f"{'workload':<19} {'side':<20} {'IOPS':>9} {'MiB/s':>8} {'/library':>9} "
          f"{'/kernel':>8}  rounds (IOPS)")
    for w in works:
        res = results[w.name]
        for who, vals in res.items():
            iops, mib = med(vals, 0), med(vals, 1)
            pers, _, eng = who.partition("-")
            lib = res.get(f"{pers}-library") if eng in engines else None
            kern = res.get(f"kernel-{PAIRS[pers]}") if pers in PAIRS else None
            r_lib = iops / med(lib, 0) if lib else None
            r_kern = iops / med(kern, 0) if kern and who != f"kernel-{PAIRS.get(pers)}" else None
            tgt = TARGET_IOPS.get(w.name) if eng in engines else None
            mark = "" if tgt is None else ("  >= target" if iops >= tgt else "  < target")
            print(f"{w.name:<19} {who:<20} {iops:>9.0f} {mib:>8.1f} "
                  f"{'' if r_lib is None else f'{r_lib:.2f}':>9} "
                  f"{'' if r_kern is None else f'{r_kern:.2f}':>8}  "
                  f"{' '.join(f'{v[0]:.0f}' for v in vals)}{mark}")
            rows.append({"workload": w.name, "side": who, "iops": iops, "mib_s": mib,
                         "vs_library": r_lib, "vs_kernel": r_kern,
                         "rounds": [v[0] for v in vals]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
