"""ufs-example: a minimal third-party ufs personality ("example"), a skeleton to copy.

Layer: personality (third party).  May import ufs.iomap, ufs.vfs, ufs.errors,
ufs.hookspecs and ufs.registry; never ufs.cli, ufs.plugins or another personality.
"""
__version__ = "0.1.0"
