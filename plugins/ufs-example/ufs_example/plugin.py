"""The ufs hooks of ufs-example: registers the "example" personality.

Layer: personality (third party).  Imports ufs.hookspecs (hookimpl), ufs.registry
(Personality, OptionSpec) and ufs.errors only.  Hook bodies stay cheap: the callables
registered here are where a real personality imports its format and ops modules.
"""
from __future__ import annotations

from ufs.errors import NotSupportedError
from ufs.hookspecs import hookimpl
from ufs.registry import OptionSpec, Personality

#: Superblock magic at byte 0 of a formatted device.
EXAMPLE_MAGIC = b"UFSEXMPL"
EXAMPLE_FORMAT_VERSION = "0"


def mkfs(device, geometry, options):
    """Format ``device``.  Not implemented yet: the skeleton stops here."""
    raise NotSupportedError("example: mkfs is not implemented yet")


def mount(device, options, readonly):
    """Mount ``device`` and return its Superblock.  Not implemented yet."""
    raise NotSupportedError("example: mount is not implemented yet")


def fsck(device, repair):
    """Check (and with ``repair`` fix) ``device``.  Not implemented yet."""
    raise NotSupportedError("example: fsck is not implemented yet")


PERSONALITY = Personality(
    name="example",
    description="third-party example personality (skeleton)",
    magic=EXAMPLE_MAGIC,
    magic_offset=0,
    mkfs=mkfs,
    mount=mount,
    fsck=fsck,
    options={
        "lockdep": OptionSpec(bool, False, help="check lock ordering (tests)"),
        "verbose": OptionSpec(int, 0, choices=(0, 1, 2), help="log level"),
    },
    version=EXAMPLE_FORMAT_VERSION,
)


@hookimpl
def ufs_register_personalities(register):
    register(PERSONALITY)
