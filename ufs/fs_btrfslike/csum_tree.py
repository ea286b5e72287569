"""The checksum tree of btrfslike: one CRC-32C per data sector, keyed by device address.

Layer: personality.  Imports ``ufs.errors``, ``ufs.iomap.csum`` and ``.format``.

Items are ``(EXTENT_CSUM_OBJECTID, EXTENT_CSUM, disk_bytenr)`` holding the checksums of the
consecutive sectors from ``disk_bytenr`` (SPEC.md §6).  Invariants: items never overlap (an
insert first removes whatever it covers, splitting items at its edges); an item never holds
more checksums than fit one leaf item; every checksummed sector lies inside a data extent
(the super layer drops the checksums of an extent when its last reference goes, through
``ExtentTree.on_data_freed``; fsck checks it).

Locking: none; callers hold the transaction manager's lock (``tm.lock``).
"""
from __future__ import annotations

from ufs.iomap.csum import block_csums

from . import format as fmt
from .format import CSUM_TREE_ID, EXTENT_CSUM, EXTENT_CSUM_OBJECTID, DiskCsumItem

__all__ = ["CsumTree", "data_csums"]

_OID = EXTENT_CSUM_OBJECTID


def data_csums(data, sectorsize):
    """The per-sector CRC-32C list of ``data`` (length a multiple of ``sectorsize``)."""
    return list(block_csums(data, sectorsize))


class CsumTree:
    """Checksum items of one filesystem (the tree is reached through ``tm`` each time, since
    the transaction manager owns the BTree object)."""

    def __init__(self, tm):
        self.tm = tm
        self.ss = tm.sectorsize
        self.max_per_item = max(1, fmt.max_item_size(tm.nodesize) // 4)

    @property
    def bt(self):
        return self.tm.tree(CSUM_TREE_ID)

    def _overlapping(self, bytenr, length):
        """``[(item_bytenr, csums)]`` of the items covering any of ``[bytenr, +length)``."""
        bt, ss, out = self.bt, self.ss, []
        prev = bt.prev_item((_OID, EXTENT_CSUM, bytenr))
        if prev is not None and prev[0][0] == _OID and prev[0][1] == EXTENT_CSUM:
            start = prev[0][2]
            cs = DiskCsumItem.decode(prev[1], f"csum item {start:#x}")
            if start + len(cs) * ss > bytenr:
                out.append((start, cs))
        for k, d in bt.items((_OID, EXTENT_CSUM, bytenr + 1), (_OID, EXTENT_CSUM, bytenr + length)):
            out.append((k[2], DiskCsumItem.decode(d, f"csum item {k[2]:#x}")))
        return out

    def lookup(self, bytenr, nsectors):
        """The checksums of ``nsectors`` sectors from ``bytenr``: a list, ``None`` where a
        sector has no checksum."""
        ss = self.ss
        out = [None] * nsectors
        for start, cs in self._overlapping(bytenr, nsectors * ss):
            for i, c in enumerate(cs):
                j = (start - bytenr) // ss + i
                if 0 <= j < nsectors:
                    out[j] = c
        return out

    def delete(self, trans, bytenr, length):
        """Remove the checksums of ``[bytenr, bytenr + length)`` (items at the edges shrink)."""
        ss, bt = self.ss, self.bt
        end = bytenr + length
        for start, cs in self._overlapping(bytenr, length):
            bt.delete(trans, (_OID, EXTENT_CSUM, start))
            iend = start + len(cs) * ss
            if start < bytenr:
                bt.insert(trans, (_OID, EXTENT_CSUM, start),
                          DiskCsumItem.encode(cs[:(bytenr - start) // ss]))
            if iend > end:
                keep = cs[(end - start) // ss:]
                bt.insert(trans, (_OID, EXTENT_CSUM, end), DiskCsumItem.encode(keep))

    def insert(self, trans, bytenr, csums):
        """Record ``csums`` for the sectors from ``bytenr`` (replacing any there)."""
        if not csums:
            return
        self.delete(trans, bytenr, len(csums) * self.ss)
        bt, step = self.bt, self.max_per_item
        for i in range(0, len(csums), step):
            bt.insert(trans, (_OID, EXTENT_CSUM, bytenr + i * self.ss),
                      DiskCsumItem.encode(csums[i:i + step]))

    def items(self):
        """Yield ``(bytenr, csums)`` for every item, in address order."""
        for k, d in self.bt.items((_OID, EXTENT_CSUM, 0), (_OID, EXTENT_CSUM + 1, 0)):
            yield k[2], DiskCsumItem.decode(d, f"csum item {k[2]:#x}")
