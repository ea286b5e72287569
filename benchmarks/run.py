#!/usr/bin/env python3
"""ufs engine vs fio, in one process run, on the same preallocated image.

    benchmarks/run.py [--runtime S] [--rounds N] [--size 1G] [--dir DIR] [--only NAME] [--json F]

For each workload, fio (`--direct=1 --ioengine=io_uring`) and the ufs engine (identity-mapped
file, benchmarks/engine.py) run back to back, `--rounds` times interleaved; the ratio reported
is the median of the per-round ratios, because this machine is shared and noisy (a single
absolute figure means little).  QD1 uses the synchronous Python call (`dio_rw`), deeper queues
the batch API (`DioBatch`).  Targets (issue 2): >=0.9 of fio at 4 KiB QD32, >=0.95 at 1 MiB
sequential, >=0.7 at 4 KiB QD1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.engine import EngineTarget  # noqa: E402
from benchmarks.fio import WORKLOADS, fio_run, have_fio, machine_info, preallocate  # noqa: E402

TARGETS = {"randwrite-4k-qd32": 0.9, "randread-4k-qd32": 0.9, "write-1m-qd8": 0.95,
           "read-1m-qd8": 0.95, "randwrite-4k-qd1": 0.7, "randread-4k-qd1": 0.7}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.upper()
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per run (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved fio/ufs rounds (default 3)")
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), ".bench"), help="work directory")
    ap.add_argument("--only", default=None, help="run workloads whose name contains this")
    ap.add_argument("--backend", default=None, choices=["io_uring", "threads"])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not have_fio():
        print("fio is not installed (make installs it as root)", file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    size = parse_size(args.size)
    image = os.path.join(args.dir, "raw.img")
    preallocate(image, size)
    target = EngineTarget(image, backend=args.backend)
    info = machine_info() | {"backend": target.dev.backend,
                             "logical_block_size": target.dev.logical_block_size,
                             "image": image, "size": size, "runtime_s": args.runtime,
                             "rounds": args.rounds}
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'workload':<20} {'ufs IOPS':>10} {'fio IOPS':>10} {'ratio':>6}  {'target':>6}  rounds")
    rows = []
    try:
        for w in WORKLOADS:
            if args.only and args.only not in w.name:
                continue
            ratios, ufs_iops, fio_iops = [], [], []
            for _ in range(args.rounds):
                f = fio_run(image, w, size, args.runtime)
                u = target.run(w, size, args.runtime)
                fio_iops.append(f["iops"])
                ufs_iops.append(u["iops"])
                ratios.append(u["iops"] / f["iops"])
            ratio = statistics.median(ratios)
            tgt = TARGETS.get(w.name)
            mark = "" if tgt is None else ("ok" if ratio >= tgt else "MISS")
            print(f"{w.name:<20} {statistics.median(ufs_iops):>10.0f} {statistics.median(fio_iops):>10.0f} "
                  f"{ratio:>6.2f}  {tgt if tgt else '-':>6} {mark:<4} "
                  f"[{' '.join(f'{r:.2f}' for r in ratios)}]", flush=True)
            rows.append({"workload": w.name, "ufs_iops": ufs_iops, "fio_iops": fio_iops,
                         "ratios": ratios, "median_ratio": ratio, "target": tgt})
    finally:
        target.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
