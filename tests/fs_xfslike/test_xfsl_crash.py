"""xfslike crash consistency: power cuts (RamDev's volatile write-cache model) at every step
of a workload of creates, buffered/DIO writes, fsyncs, renames, unlinks and truncates.

After each step several crash images are taken; each must mount (replaying the journal), hold
everything an fsync promised (names and bytes), show no stale data in other files (every byte
is what was written or zero), and check clean with fsck after the unmount."""
from __future__ import annotations

import os
import random

from ufs import api
from ufs.fs_xfslike import plugin
from ufs.iomap import RamDev, aligned_buffer

P = plugin.PERSONALITY
BS = 4096


def abuf(data: bytes):
    b = aligned_buffer(len(data))
    memoryview(b)[:] = data
    return b


def check_image(img: bytes, promised: dict, ever: dict) -> int:
    """Check one crash image; return the number of journal records its mount replayed."""
    dev = RamDev(len(img), 512, data=img)
    with api.mount(dev, personality=P) as fs:
        replayed = fs.sb.md.replayed
        names = set(fs.listdir("/"))
        for name, data in promised.items():
            assert name in names, f"fsynced {name} lost"
            fd = fs.open("/" + name, os.O_RDONLY)
            assert fs.fstat(fd).st_size == len(data), name
            assert fs.pread(fd, len(data), 0) == data, f"fsynced data of {name} differs"
            fs.close(fd)
        for name in names:
            if name in promised:
                continue
            fd = fs.open("/" + name, os.O_RDONLY)
            size = fs.fstat(fd).st_size
            got = fs.pread(fd, size, 0)
            fs.close(fd)
            want = ever.get(name, b"")
            for i, ch in enumerate(got):
                if ch and (i >= len(want) or ch != want[i]):
                    raise AssertionError(f"{name}: byte {i} is {ch}, never written there")
    report = api.fsck(dev, personality=P)
    assert report.clean, report.errors
    return replayed


def test_power_cut_at_every_step_keeps_fsynced_state():
    rng = random.Random(7)
    dev = RamDev(16 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    promised: dict[str, bytes] = {}
    written: dict[str, bytes] = {}
    ever: dict[str, bytes] = {}          # every name a data set was ever reachable under
    images = []
    try:
        for step in range(24):
            name = f"f{step}"
            size = rng.choice([100, BS, 3 * BS + 7, 9 * BS])
            data = bytes(rng.randrange(1, 256) for _ in range(16)) * (size // 16 + 1)
            data = data[:size]
            direct = step % 3 == 0 and size % 512 == 0
            fd = fs.open("/" + name, os.O_CREAT | os.O_RDWR | (os.O_DIRECT if direct else 0), 0o644)
            fs.pwrite(fd, abuf(data) if direct else data, 0)
            written[name] = ever[name] = data
            if step % 2 == 0:
                fs.fsync(fd)                      # forces the log: everything before is durable
                promised = {n: written[n] for n in written if n in promised or n == name}
            fs.close(fd)
            if step % 5 == 4 and promised:
                victim = min(promised)
                fs.rename("/" + victim, "/r" + victim)
                written["r" + victim] = ever["r" + victim] = written.pop(victim)
                promised.pop(victim)
            if step % 7 == 6:
                gone = min(written)
                fs.unlink("/" + gone)
                written.pop(gone)
                promised.pop(gone, None)
            images.append((dev.crash(seed=step), dict(promised), dict(ever)))
        replays = [check_image(img, prom, wr) for img, prom, wr in images]
        assert sum(1 for r in replays if r) >= len(images) // 2   # recovery really ran
    finally:
        fs.unmount()


def test_crash_mid_big_directory_and_truncate_replays_consistently():
    dev = RamDev(32 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    try:
        fs.mkdir("/d", 0o755)
        for i in range(300):                       # short form -> dirbt with splits
            fs.close(fs.open(f"/d/n{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        fd = fs.open("/d/n0", os.O_RDWR)
        fs.write(fd, b"k" * 20 * BS)
        fs.fsync(fd)
        fs.ftruncate(fd, 3 * BS)
        for i in range(0, 300, 3):
            fs.unlink(f"/d/n{i + 1}")
        imgs = [dev.crash(seed=s) for s in range(3)]
        fs.fsync(fd)
        durable = dev.crash(seed=99, keep_probability=0.0)
    finally:
        fs.unmount()
    for img in imgs:
        d = RamDev(len(img), 512, data=img)
        with api.mount(d, personality=P) as f2:
            names = set(f2.listdir("/d"))
            assert "n0" in names and len(names) in range(200, 301)
            assert f2.stat("/d/n0").st_size in (3 * BS, 20 * BS)
        assert api.fsck(d, personality=P).clean
    d = RamDev(len(durable), 512, data=durable)
    with api.mount(d, personality=P) as f2:
        assert len(f2.listdir("/d")) == 200 and f2.stat("/d/n0").st_size == 3 * BS
    r = api.fsck(d, personality=P)
    assert r.clean, r.errors


def test_read_only_mount_of_a_crashed_image_replays_in_memory_only():
    dev = RamDev(16 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    try:
        fs.mkdir("/kept", 0o755)
        fd = fs.open("/kept/f", os.O_CREAT | os.O_RDWR, 0o644)
        fs.write(fd, b"ro" * 3000)
        fs.fsync(fd)
        img = dev.crash(seed=3)
    finally:
        fs.unmount()
    ro = RamDev(len(img), 512, data=img, read_only=True)
    with api.mount(ro, personality=P, readonly=True) as f2:
        assert f2.sb.md.replayed > 0
        assert f2.pread(f2.open("/kept/f", os.O_RDONLY), 6000, 0) == b"ro" * 3000
    assert ro.contents() == img
