"""fio and the kernel's filesystems as baselines, run in the same process run as ufs.

Owns: running fio (`--direct=1 --ioengine=io_uring`) on a file and parsing its JSON, preparing
preallocated images, and loop-mounting the kernel's XFS/btrfs for comparison.  Imports only the
standard library.  Needs root for loop devices; fio must be installed (`make` installs it).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One fio-style job.  `rw` is fio's --rw; sizes are bytes."""

    name: str
    rw: str            # randread | randwrite | read | write
    bs: int
    iodepth: int
    dsync: bool = False

    @property
    def is_write(self) -> bool:
        return "write" in self.rw

    @property
    def is_random(self) -> bool:
        return self.rw.startswith("rand")


WORKLOADS = [
    Workload("randwrite-4k-qd1", "randwrite", 4096, 1),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("write-1m-qd8", "write", 1 << 20, 8),
    Workload("read-1m-qd8", "read", 1 << 20, 8),
    Workload("dsync-4k-qd1", "randwrite", 4096, 1, dsync=True),
]


def have_fio() -> bool:
    return shutil.which("fio") is not None


def fio_run(path: str, w: Workload, size: int, runtime_s: float, offset: int = 0) -> dict:
    """Run one fio job on `path` and return {"iops", "mib_s", "lat_us"}."""
    args = [
        "fio", "--name=bench", f"--filename={path}", f"--size={size}", f"--offset={offset}",
        "--direct=1", "--ioengine=io_uring", f"--rw={w.rw}", f"--bs={w.bs}",
        f"--iodepth={w.iodepth}", f"--runtime={runtime_s}", "--time_based",
        "--group_reporting", "--output-format=json", "--randrepeat=0", "--norandommap",
    ]
    if w.dsync:
        args.append("--sync=dsync")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if w.is_write else job["read"]
    return {
        "iops": float(side["iops"]),
        "mib_s": float(side["bw_bytes"]) / (1 << 20),
        "lat_us": float(side["clat_ns"]["mean"]) / 1000.0,
    }


def preallocate(path: str, size: int) -> None:
    """Write the whole image once so reads hit the device, not holes."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    subprocess.run(["fio", "--name=fill", f"--filename={path}", f"--size={size}", "--rw=write",
                    "--bs=1m", "--direct=1", "--ioengine=psync"], check=True, capture_output=True)


@contextlib.contextmanager
def kernel_fs(fstype: str, image_size: int, workdir: str):
    """Loop-mount a fresh kernel `fstype` ("xfs"/"btrfs") image with --direct-io=on.

    Yields the mount point.  Always unmounts and detaches, even on failure.
    """
    img = os.path.join(workdir, f"kernel-{fstype}.img")
    mnt = tempfile.mkdtemp(prefix=f"ufs-bench-{fstype}-", dir=workdir)
    loop = None
    try:
        with open(img, "wb") as f:
            f.truncate(image_size)
        mkfs = {"xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}[fstype]
        subprocess.run(mkfs + [img], check=True, capture_output=True)
        loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", img],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, mnt], check=True, capture_output=True)
        yield mnt
    finally:
        _umount_retry(mnt)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
        with contextlib.suppress(OSError):
            os.unlink(img)


def _umount_retry(mnt: str, attempts: int = 50) -> None:
    """Unmount, retrying EBUSY: a killed fio's io_uring teardown holds the mount briefly."""
    import time

    for _ in range(attempts):
        r = subprocess.run(["umount", mnt], capture_output=True, text=True)
        if r.returncode == 0 or "not mounted" in r.stderr or not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], capture_output=True)   # last resort: detach lazily


def machine_info() -> dict:
    """What the ratios were measured on."""
    info = {"kernel": os.uname().release, "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    return info
