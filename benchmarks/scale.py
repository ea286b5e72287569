#!/usr/bin/env python3
"""Scale benchmark: many files in one mount, with bounded memory (DESIGN.md "Memory").

    benchmarks/scale.py [--files N] [--dirs D] [--big-dir N] [--file-size BYTES]
                        [--personality xfslike|btrfslike] [--image PATH] [--size BYTES]
                        [--inode-cache N] [--samples N] [--keep] [--json FILE]

Owns: the scale run and its report.  Imports ``ufs.api`` only (the public API, in-process).

What it measures, on a sparse image file made by ``ufs.mkfs`` (big enough for the files):
- creation of ``--files`` small files (``--file-size`` bytes each, 512 by default, 0 for empty
  files), ``--big-dir`` of them in one directory (``/big``, default 100,000 or half the files
  when there are fewer than 200,000) and the rest spread round-robin over ``--dirs``
  directories;
- at every 10 % of the files: files created, creates/s over the last interval, the latency of
  ``stat`` on a random sample of existing names (p50/p99 in microseconds; the names are
  random, so most are not in the inode cache), the process RSS (VmRSS) and its peak
  (VmHWM) from /proc/self/status, and the inode cache's LRU size and live inode count;
- at the end: unmount (time), remount (time), a random ``stat`` sample on the cold mount,
  a full ``listdir`` of the big directory (time), unmount, and ``ufs.fsck`` (time, result).

The claim checked (DESIGN.md): creates/s and stat latency do not degrade beyond O(log n) as
the file count grows, and RSS stays bounded (under 512 MiB for 1,000,000 files): the inode
cache keeps at most ``inode_cache`` inodes (mount option; default 16384) plus the ones in use
or dirty.  Needs no root: the image is a regular file (``--image``, default
``./.bench/scale-<personality>.img``, removed at the end unless ``--keep``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ufs import api  # noqa: E402


def proc_status() -> dict:
    """VmRSS and VmHWM of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def pct(samples: list, q: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


class Layout:
    """Where file number ``i`` lives: the first ``big`` in /big, the rest round-robin over
    ``dirs`` directories."""

    def __init__(self, files: int, dirs: int, big: int):
        self.files, self.dirs, self.big = files, dirs, big

    def path(self, i: int) -> str:
        if i < self.big:
            return f"/big/f{i:07d}"
        j = i - self.big
        return f"/d{j % self.dirs:04d}/f{j // self.dirs:07d}"

    def directories(self) -> list:
        return ["/big"] + [f"/d{k:04d}" for k in range(self.dirs)]


def stat_sample(fs, layout: Layout, upto: int, n: int, rng: random.Random) -> dict:
    lat = []
    for _ in range(n):
        p = layout.path(rng.randrange(upto))
        t = time.perf_counter()
        fs.stat(p)
        lat.append((time.perf_counter() - t) * 1e6)
    return {"stat_p50_us": round(pct(lat, 0.50), 1), "stat_p99_us": round(pct(lat, 0.99), 1)}


def default_size(files: int, file_size: int) -> int:
    """Bytes of image: per file one inode (512 B), its data blocks, a directory entry, and
    slack for the journal and the trees; at least 1 GiB.  The image is sparse."""
    data_blk = -(-file_size // 4096)
    per_file = 512 + data_blk * 4096 + 128
    return max(1 << 30, int(files * per_file * 1.6) + (256 << 20))


def run(args) -> dict:
    rng = random.Random(args.seed)
    big = args.big_dir if args.big_dir is not None else (
        100_000 if args.files >= 200_000 else args.files // 2)
    big = min(big, args.files)
    layout = Layout(args.files, args.dirs, big)
    image = args.image or os.path.join(".bench", f"scale-{args.personality}.img")
    os.makedirs(os.path.dirname(os.path.abspath(image)), exist_ok=True)
    if os.path.exists(image):
        os.unlink(image)
    size = args.size or default_size(args.files, args.file_size)
    opts = f"inode_cache={args.inode_cache}" if args.inode_cache else None
    report = {"personality": args.personality, "files": args.files, "dirs": args.dirs,
              "big_dir": big, "file_size": args.file_size, "image_bytes": size,
              "inode_cache": args.inode_cache, "checkpoints": []}
    payload = b"s" * args.file_size
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    try:
        t = time.perf_counter()
        api.mkfs(image, args.personality, size=size)
        report["mkfs_s"] = round(time.perf_counter() - t, 2)
        fs = api.mount(image, opts)
        try:
            report["inode_cache"] = fs.sb.s_inode_cache_max
            for d in layout.directories():
                fs.mkdir(d)
            step = max(1, args.files // 10)
            t0 = t_last = time.perf_counter()
            last = 0
            for i in range(args.files):
                fd = fs.open(layout.path(i), flags, 0o644)
                if payload:
                    fs.write(fd, payload)
                fs.close(fd)
                done = i + 1
                if done % step == 0 or done == args.files:
                    now = time.perf_counter()
                    cp = {"files": done,
                          "creates_per_s": round((done - last) / (now - t_last)),
                          "elapsed_s": round(now - t0, 1)}
                    cp.update(stat_sample(fs, layout, done, args.samples, rng))
                    cp.update(proc_status())
                    cp["icache_lru"] = fs.sb.icache_count()
                    cp["icache_live"] = fs.sb.icache_live()
                    report["checkpoints"].append(cp)
                    print(f"{done:>9} files  {cp['creates_per_s']:>6}/s  stat p50 "
                          f"{cp['stat_p50_us']:>7} us p99 {cp['stat_p99_us']:>8} us  RSS "
                          f"{cp['VmRSS'] / 1024:7.1f} MiB  peak {cp['VmHWM'] / 1024:7.1f} MiB  "
                          f"icache {cp['icache_lru']}/{cp['icache_live']}  "
                          f"{cp['elapsed_s']} s", flush=True)
                    t_last, last = time.perf_counter(), done
            report["create_s"] = round(time.perf_counter() - t0, 1)
            t = time.perf_counter()
        finally:
            fs.unmount()
        report["unmount_s"] = round(time.perf_counter() - t, 2)
        del fs
        gc.collect()
        t = time.perf_counter()
        fs = api.mount(image, opts)
        try:
            report["remount_s"] = round(time.perf_counter() - t, 2)
            report["cold"] = stat_sample(fs, layout, args.files, args.samples, rng)
            t = time.perf_counter()
            n = len(fs.listdir("/big"))
            report["listdir_big_s"] = round(time.perf_counter() - t, 2)
            if n != big:
                raise SystemExit(f"/big lists {n} entries, expected {big}")
            report["cold"].update(proc_status())
        finally:
            fs.unmount()
        report["peak_rss_mount_mib"] = round(proc_status()["VmHWM"] / 1024, 1)
        t = time.perf_counter()
        rep = api.fsck(image)
        report["fsck_s"] = round(time.perf_counter() - t, 1)
        report["fsck_clean"] = rep.clean
        report["fsck_errors"] = [str(e) for e in rep.errors[:5]]
        report["peak_rss_mib"] = round(proc_status()["VmHWM"] / 1024, 1)
    finally:
        if not args.keep and os.path.exists(image):
            os.unlink(image)
    c = report["cold"]
    print(f"unmount {report['unmount_s']} s, remount {report['remount_s']} s, cold stat p50 "
          f"{c['stat_p50_us']} us p99 {c['stat_p99_us']} us, listdir /big ({big}) "
          f"{report['listdir_big_s']} s, fsck {report['fsck_s']} s "
          f"{'clean' if report['fsck_clean'] else report['fsck_errors']}, peak RSS "
          f"{report['peak_rss_mount_mib']} MiB before fsck, {report['peak_rss_mib']} MiB "
          f"with fsck")
    if len(report["checkpoints"]) >= 2:
        a, b = report["checkpoints"][0], report["checkpoints"][-1]
        per_file = (b["VmRSS"] - a["VmRSS"]) * 1024 / max(1, b["files"] - a["files"])
        report["rss_bytes_per_file_after_first_checkpoint"] = round(per_file, 1)
        rates = [cp["creates_per_s"] for cp in report["checkpoints"]]
        report["creates_per_s_median"] = statistics.median(rates)
        print(f"RSS growth after the first checkpoint: {per_file:.1f} bytes/file; creates/s "
              f"first {rates[0]} last {rates[-1]} median {report['creates_per_s_median']}")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Create many small files in one ufs mount and report, every 10%% of "
                    "them, creates/s, random stat latency (p50/p99) and RSS (VmRSS/VmHWM); "
                    "then unmount, remount, time a cold stat sample and a listdir of the "
                    "100k-entry directory, and fsck.  Checks the O(log n) and bounded-memory "
                    "claims of DESIGN.md.")
    ap.add_argument("--files", type=int, default=1_000_000, help="files to create (default "
                    "1,000,000)")
    ap.add_argument("--dirs", type=int, default=100, help="directories the files outside "
                    "/big are spread over (default 100)")
    ap.add_argument("--big-dir", type=int, default=None, help="files in the one big "
                    "directory /big (default 100,000, or half the files below 200,000)")
    ap.add_argument("--file-size", type=int, default=512, help="bytes per file (default 512)")
    ap.add_argument("--personality", default="xfslike", help="xfslike (default) or btrfslike")
    ap.add_argument("--image", default=None, help="image file (default "
                    "./.bench/scale-<personality>.img)")
    ap.add_argument("--size", type=int, default=None, help="image bytes (default: enough for "
                    "the files; sparse)")
    ap.add_argument("--inode-cache", type=int, default=None, help="mount option inode_cache "
                    "(default: the personality's, 16384)")
    ap.add_argument("--samples", type=int, default=1000, help="stats per latency sample "
                    "(default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the image")
    ap.add_argument("--json", default=None, help="write the report as JSON to this file")
    args = ap.parse_args(argv)
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report.get("fsck_clean") else 1


if __name__ == "__main__":
    sys.exit(main())
