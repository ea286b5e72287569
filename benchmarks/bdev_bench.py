#!/usr/bin/env python3
"""Raw device-layer throughput next to fio, on the same preallocated image.

    .venv/bin/python benchmarks/bdev_bench.py [--image PATH] [--seconds 5] [--backend io_uring]

Runs, for each workload, fio (--direct=1 --ioengine=io_uring) and then
``ufs.iomap.bdev._bench_queue`` (bios straight through one IoQueue, no GIL) twice:
"ufs" unplugs after every bio (fio's default iodepth_batch_submit=1), "batch"
resubmits every bio refilled after a reap in one unplug.  Both on the
same 1 GiB image, alternating them ``--repeat`` times, and prints the median IOPS,
MiB/s and the median of the per-pair ratios ufs/fio.  Not a test.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ufs.iomap import bdev

GiB = 1 << 30
WORKLOADS = [  # name, fio rw, ufs op, bs, qd
    ("randread-4k-qd1", "randread", "randread", 4096, 1),
    ("randread-4k-qd32", "randread", "randread", 4096, 32),
    ("randwrite-4k-qd1", "randwrite", "randwrite", 4096, 1),
    ("randwrite-4k-qd32", "randwrite", "randwrite", 4096, 32),
    ("read-1m-qd8", "read", "read", 1 << 20, 8),
    ("write-1m-qd8", "write", "write", 1 << 20, 8),
]


def fio_iops(image, rw, bs, qd, seconds):
    out = subprocess.run(
        ["fio", "--name=a", f"--filename={image}", "--size=1G", "--direct=1",
         "--ioengine=io_uring", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
         f"--runtime={seconds}", "--time_based", "--group_reporting",
         "--output-format=terse", "--terse-version=3"],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    f = out.split(";")
    return float(f[7]) + float(f[48])   # read IOPS + write IOPS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", help="1 GiB image to use (created and filled if missing)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--backend", default="io_uring", choices=["io_uring", "threads"])
    ap.add_argument("--no-fill", action="store_true", help="do not fill the image first")
    ap.add_argument("--hugepages", action="store_true",
                    help="ufs buffers madvise(MADV_HUGEPAGE) (fio's are plain malloc)")
    ap.add_argument("--only", help="comma-separated workload names")
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternate fio/ufs runs this many times and report medians "
                         "(a VM disk is noisy)")
    args = ap.parse_args()
    if shutil.which("fio") is None:
        sys.exit("fio is not installed")
    tmpdir = None
    image = args.image
    if image is None:
        tmpdir = tempfile.mkdtemp(prefix="bdev-bench-", dir=os.environ.get("BENCH_DIR", "/tmp"))
        image = os.path.join(tmpdir, "raw.img")
    try:
        if not args.no_fill and (not os.path.exists(image) or os.path.getsize(image) < GiB):
            # Fully written so reads hit real blocks, as fio-anchors.sh does.
            subprocess.run(["fio", "--name=fill", f"--filename={image}", "--size=1G", "--rw=write",
                            "--bs=1m", "--direct=1", "--ioengine=psync"], check=True,
                           capture_output=True)
        only = set(args.only.split(",")) if args.only else None
        print(f"# machine: {os.cpu_count()} cpus, {os.uname().release}; image {image}; "
              f"{args.seconds:g}s per run; ufs backend {args.backend}")
        print(f"{'workload':20s} {'fio IOPS':>10s} {'ufs IOPS':>10s} {'fio MiB/s':>10s} "
              f"{'ufs MiB/s':>10s} {'ufs/fio':>8s} {'batch/fio':>9s}")
        dev = bdev.open_device(image, backend=args.backend)
        try:
            for name, rw, op, bs, qd in WORKLOADS:
                if only and name not in only:
                    continue
                fs, us, bs_ = [], [], []
                for _ in range(max(1, args.repeat)):
                    fs.append(fio_iops(image, rw, bs, qd, args.seconds))
                    # unplug after every bio, as fio's default iodepth_batch_submit=1
                    us.append(bdev._bench_queue(dev, op, bs, qd, args.seconds, GiB,
                                                submit_each=True, hugepages=args.hugepages))
                    # every bio refilled after a reap goes in one unplug
                    bs_.append(bdev._bench_queue(dev, op, bs, qd, args.seconds, GiB,
                                                 submit_each=False, hugepages=args.hugepages))
                # Ratio of each adjacent (fio, ufs) pair, then the median: robust
                # to a machine whose speed drifts (other jobs on a shared VM).
                ratio = statistics.median(u_ / f_ for f_, u_ in zip(fs, us))
                bratio = statistics.median(b_ / f_ for f_, b_ in zip(fs, bs_))
                f, u = statistics.median(fs), statistics.median(us)
                print(f"{name:20s} {f:10.0f} {u:10.0f} {f * bs / 2**20:10.1f} "
                      f"{u * bs / 2**20:10.1f} {ratio:8.3f} {bratio:9.3f}", flush=True)
        finally:
            dev.close()
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
