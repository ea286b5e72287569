#!/usr/bin/env python3
"""fio through a ufs FUSE mount, beside fio on the library-level engine and on kernel XFS.

    benchmarks/fuse_bench.py [--runtime S] [--rounds N] [--dir DIR] [--engines native,pyfuse3]
                             [--only NAME] [--json F]

For each workload (4 KiB random read at QD32, the issue-5 target of >= 40,000 IOPS, and at
QD1; 4 KiB random write at QD32 for information) and each round, back to back on the same
machine state:
- ``raw``: fio on the preallocated raw image (the device limit),
- ``engine``: the ufs DIO engine on that image, identity-mapped (benchmarks/engine.py: the
  library without FUSE and without a personality),
- ``kernel-xfs``: fio on a file of the kernel's XFS (loop, --direct-io=on),
- ``ufs-ENGINE``: fio (``--direct=1 --ioengine=io_uring``) on a file of an xfslike image
  mounted with ``ufs mount-image`` (``-o fuse_native`` or the default pyfuse3 engine).
The figures are medians over the rounds; the per-round values are printed too (the machine
is a shared VM: read them before trusting a row).  Needs root, fio, /dev/fuse.
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

WORKLOADS = [
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
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
    """An xfslike image mounted through FUSE with one engine, holding a filled test file."""

    def __init__(self, workdir: str, engine: str):
        self.image = os.path.join(workdir, f"ufs-xfslike-{engine}.img")
        self.mp = tempfile.mkdtemp(prefix=f"ufs-fuse-{engine}-", dir=workdir)
        self.engine = engine
        self.env = dict(os.environ)
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env["PYTHONPATH"] = top + (os.pathsep + self.env["PYTHONPATH"]
                                        if self.env.get("PYTHONPATH") else "")

    def __enter__(self):
        if os.path.exists(self.image):
            os.unlink(self.image)
        _ufs("mkfs", "-t", "xfslike", "-s", "1G", self.image, env=self.env)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), ".bench"), help="work directory")
    ap.add_argument("--engines", default="native,pyfuse3", help="FUSE engines to measure")
    ap.add_argument("--only", default=None, help="run workloads whose name contains this")
    ap.add_argument("--no-kernel", action="store_true", help="skip kernel XFS")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not have_fio():
        print("fio is not installed", file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    raw = os.path.join(args.dir, "raw.img")
    preallocate(raw, 1 << 30)
    engines = [e for e in args.engines.split(",") if e]
    works = [w for w in WORKLOADS if not args.only or args.only in w.name]
    print("# " + ", ".join(f"{k}={v}" for k, v in (machine_info() | {
        "runtime_s": args.runtime, "rounds": args.rounds, "file": FILE_SIZE}).items()))
    results: dict = {w.name: {} for w in works}

    def record(w, who, iops):
        results[w.name].setdefault(who, []).append(iops)

    for _ in range(args.rounds):
        target = EngineTarget(raw)
        try:
            for w in works:
                record(w, "raw", fio_run(raw, w, 1 << 30, args.runtime)["iops"])
                record(w, "engine", target.run(w, 1 << 30, args.runtime)["iops"])
        finally:
            target.close()
        if not args.no_kernel:
            with kernel_fs("xfs", 1 << 30, args.dir) as mnt:
                f = os.path.join(mnt, "f")
                preallocate(f, FILE_SIZE)
                for w in works:
                    record(w, "kernel-xfs", fio_run(f, w, FILE_SIZE, args.runtime)["iops"])
        for eng in engines:
            with UfsMount(args.dir, eng) as m:
                for w in works:
                    record(w, f"ufs-{eng}", fio_run(m.path, w, FILE_SIZE, args.runtime)["iops"])

    rows = []
    for w in works:
        for who, vals in results[w.name].items():
            med = statistics.median(vals)
            tgt = TARGET_IOPS.get(w.name) if who.startswith("ufs-") else None
            mark = "" if tgt is None else ("  >= target" if med >= tgt else "  < target")
            print(f"{w.name:<20} {who:<14} {med:>10.0f} IOPS   rounds "
                  f"{' '.join(f'{v:.0f}' for v in vals)}{mark}")
            rows.append({"workload": w.name, "who": who, "iops": med, "rounds": vals})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
