"""YAML profiles for ``ufs mkfs --config FILE.yaml``.

Layer: top (used by ``ufs.cli``).  Imports PyYAML, ``ufs.api.parse_size`` and ``ufs.errors``.

A profile is a mapping with these keys (all optional)::

    personality: btrfslike      # or "type"; the -t value
    size: 512M                  # bytes or K/M/G/T suffix
    block_size: 4096            # or "blocksize"; a power of two
    options:                    # the personality's mkfs options: a mapping or "a=1,b"
      nodesize: 16384

Command-line flags override the profile.  An unknown key, a value of the wrong type, or a
file that is not a YAML mapping raises :class:`ConfigError` (EINVAL) naming the file and key.
"""
from __future__ import annotations

import errno as _errno

from ufs.errors import InvalidError

__all__ = ["ConfigError", "MKFS_KEYS", "load_mkfs_profile"]

MKFS_KEYS = ("personality", "size", "block_size", "options")
_ALIASES = {"type": "personality", "blocksize": "block_size"}


class ConfigError(InvalidError):
    """A bad profile: the message names the file and the key."""


def load_mkfs_profile(path: str) -> dict:
    """The profile in ``path`` as ``{personality, size (int bytes), block_size, options}``,
    with only the keys the file gives."""
    import yaml

    from ufs.api import parse_size

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(_errno.ENOENT, f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(_errno.EINVAL, f"{path}: not valid YAML{where}: "
                                         f"{getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(_errno.EINVAL, f"{path}: a profile must be a mapping of keys, "
                                         f"not a {type(data).__name__}")
    out: dict = {}
    for raw_key, value in data.items():
        key = _ALIASES.get(raw_key, raw_key)
        if key not in MKFS_KEYS:
            raise ConfigError(_errno.EINVAL, f"{path}: unknown key {raw_key!r} (known: "
                                             f"{', '.join(MKFS_KEYS)})")
        if key in out:
            raise ConfigError(_errno.EINVAL, f"{path}: key {raw_key!r} given twice")
        try:
            if key == "personality":
                if not isinstance(value, str) or not value:
                    raise ValueError("must be a personality name")
                out[key] = value
            elif key == "size":
                if isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise ValueError("must be bytes or a size like 512M")
                out[key] = parse_size(value)
                if out[key] <= 0:
                    raise ValueError("must be positive")
            elif key == "block_size":
                if isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise ValueError("must be a power of two like 4096")
                bs = parse_size(value)
                if bs < 512 or bs & (bs - 1):
                    raise ValueError("must be a power of two, at least 512")
                out[key] = bs
            elif key == "options":
                if isinstance(value, str):
                    out[key] = value
                elif isinstance(value, dict):
                    for k, v in value.items():
                        if not isinstance(k, str) or isinstance(v, (dict, list)):
                            raise ValueError(f"option {k!r} must be a scalar")
                    out[key] = {str(k): v for k, v in value.items()}
                elif value is None:
                    out[key] = {}
                else:
                    raise ValueError("must be a mapping or a string a=1,b")
        except (ValueError, OSError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(_errno.EINVAL, f"{path}: key {raw_key!r}: bad value "
                                             f"{value!r}: {msg}") from None
    return out
