"""xfslike directory scale: creates and lookups in one directory stay O(log n).

Default: 20,000 entries (a few seconds).  ``UFS_SLOW=1``: 100,000 entries.  The check is on
the *shape* of the cost: the last fifth of the creates may not be much slower per entry than
the first fifth (a linear directory would be ~9x slower), the metadata blocks visited per
create stay flat, and a lookup touches only the dirbt path."""
from __future__ import annotations

import os
import time

from ufs import api
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike import plugin
from ufs.iomap import RamDev

P = plugin.PERSONALITY
SLOW = os.environ.get("UFS_SLOW") == "1"
N = 100_000 if SLOW else 20_000


def test_big_directory_stays_logarithmic():
    dev = RamDev((256 if SLOW else 96) << 20, 512)
    api.mkfs(dev, personality=P)
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o755)
        fifth = N // 5
        per_fifth = []
        visits_fifth = []
        cache = fs.sb.md.cache
        t = time.perf_counter()
        v = cache.reads + cache.hits
        for i in range(N):
            fs.close(fs.open(f"/d/file-{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644))
            if (i + 1) % fifth == 0:
                now = time.perf_counter()
                per_fifth.append((now - t) / fifth)
                nv = cache.reads + cache.hits
                visits_fifth.append((nv - v) / fifth)
                t, v = now, nv
        d = fs.sb.iget(fs.stat("/d").st_ino)
        assert d.di.data_format == fmt.FMT_BTREE and d.di.nextents == N
        assert d.di.bmbt_level >= 2
        # O(log n): metadata blocks visited per create grow with the tree height only, and
        # the last fifth costs at most 5x the time of the first (linear would be ~9x; the
        # margin absorbs a loaded machine)
        assert visits_fifth[-1] < 2 * visits_fifth[0], visits_fifth
        assert per_fifth[-1] < 5 * per_fifth[0], per_fifth
        reads0 = cache.reads + cache.hits
        for i in range(0, N, N // 100):
            assert fs.stat(f"/d/file-{i:07d}").st_ino
        visits = (cache.reads + cache.hits - reads0) / 100
        assert visits < 4 * (d.di.bmbt_level + 1) + 8, visits
        names = fs.listdir("/d")
        assert len(names) == N and len(set(names)) == N
        for i in range(0, N, 2):
            fs.unlink(f"/d/file-{i:07d}")
        assert d.di.nextents == N // 2
        print(f"\n{N} entries: us/create per fifth {[round(x * 1e6) for x in per_fifth]}, "
              f"buffer visits/create {[round(x, 1) for x in visits_fifth]}, "
              f"{visits:.1f} buffer visits/lookup")
    if SLOW:
        rep = api.fsck(dev, personality=P)
        assert rep.clean, rep.errors
