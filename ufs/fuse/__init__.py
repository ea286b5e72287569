"""FUSE front end of ufs: serve a mounted image to the kernel through pyfuse3 (libfuse 3).

Layer: top.  ``ufs.fuse.mount`` (daemon, handshake, umount) imports pyfuse3 lazily, so this
package imports without pyfuse3 installed; ``ufs.fuse.adapter`` needs it.

Public: :func:`mount_image`, :func:`umount`, :func:`serve`, :func:`fuse_available`,
:func:`find_mount`.
"""
from ufs.fuse.mount import find_mount, fuse_available, mount_image, serve, umount

__all__ = ["find_mount", "fuse_available", "mount_image", "serve", "umount"]
