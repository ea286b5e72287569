"""The personality registry: what plugins registered, frozen, validated, and probed.

Layer: plugin machinery.  Imports only ``ufs.errors`` and the standard library (no pluggy:
``ufs.plugins`` drives the hooks and feeds the ``register`` callbacks built here).
Personalities import :class:`Personality` and :class:`OptionSpec` from this module.

Owns:
- :class:`Personality`, the record a plugin passes to ``register`` in
  ``ufs_register_personalities``: name, magic/probe, ``mkfs``/``mount``/``fsck``
  callables, the mount/mkfs options it accepts (:class:`OptionSpec`), version, source.
- :class:`DeviceType`, the record of ``ufs_register_devices``.
- :class:`RegistryBuilder` (the register callbacks; rejects duplicates naming both
  plugins) and :class:`Registry`, an immutable ``name -> Personality`` mapping with
  :meth:`Registry.probe` (which personality formatted this device?).
- :func:`parse_options`: ``"a=1,b,c=x"`` or a mapping -> a validated dict.

Invariants: records are frozen and validated when constructed (a malformed record fails
at registration with :class:`PluginError`, not at first use); a Registry never changes
after it is built.  Nothing here is on the I/O path.
"""
from __future__ import annotations

import errno as _errno
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from collections.abc import Callable, Iterator, Mapping

from ufs.errors import FsError, InvalidError, PluginError

__all__ = ["PROBE_SIZE", "VFS_OPTIONS", "OptionSpec", "Personality", "DeviceType", "Registry",
           "RegistryBuilder", "OptionError", "UnknownTypeError", "int_option", "parse_options",
           "read_probe_buffer"]

#: Bytes read from the start of a device for probing: every personality's magic must lie
#: inside (XFS and btrfs superblocks sit at 0 and 64 KiB - 1 block respectively in ours).
PROBE_SIZE = 64 * 1024

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OptionError(InvalidError, PluginError):
    """A mount/mkfs option is unknown or has a bad value (EINVAL, as mount(2) gives).

    Both an :class:`~ufs.errors.InvalidError` (OSError, EINVAL) and a
    :class:`~ufs.errors.PluginError`.
    """


class UnknownTypeError(FsError, PluginError):
    """No personality of that name is registered (ENODEV, mount(2)'s "unknown filesystem type")."""

    errno_value = _errno.ENODEV


# --- Records ---

@dataclass(frozen=True)
class OptionSpec:
    """One option a personality accepts (``-o name=value``).

    :param type: ``bool``, ``int``, ``float``, ``str``, or any callable turning the
        option's string (or a Python value from a mapping) into the value; it signals a
        bad value by raising ``ValueError``/``TypeError``.  ``int`` accepts ``0x``/``0o``
        prefixes.  A bare ``name`` (no ``=``) is allowed for ``bool`` only and means True.
    :param default: value when the option is not given (not converted or checked).
    :param choices: if not None, the converted value must be one of these.
    :param help: one line for ``ufs mkfs --help``-style listings.
    """

    type: Callable[[Any], Any] = str
    default: Any = None
    choices: tuple | None = None
    help: str = ""

    def __post_init__(self):
        if not callable(self.type):
            raise PluginError(f"OptionSpec.type must be callable, got {self.type!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    def convert(self, key: str, value: Any) -> Any:
        """The value of option ``key`` given as ``value`` (``None`` = bare ``key``)."""
        typ = self.type
        try:
            if typ is bool:
                if value is None or value is True or value is False:
                    out = True if value is None else value
                elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                    out = value.strip().lower() in _TRUE
                elif isinstance(value, int) and value in (0, 1):
                    out = bool(value)
                else:
                    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
            elif value is None:
                raise ValueError("needs a value")
            elif typ is int:
                if isinstance(value, bool):
                    raise TypeError("not an integer")
                out = int(value, 0) if isinstance(value, str) else int(value)
                if not isinstance(value, str) and out != value:
                    raise ValueError("not an integer")
            else:
                out = typ(value)
        except (ValueError, TypeError) as e:
            shown = "(no value)" if value is None else f"{value!r}"
            raise OptionError(f"option {key!r}: bad value {shown}: {e}") from None
        if self.choices is not None and out not in self.choices:
            raise OptionError(f"option {key!r}: bad value {value!r}: "
                              f"must be one of {', '.join(map(str, self.choices))}")
        return out


def int_option(lo: int, hi: int | None = None, *, pow2: bool = False) -> Callable[[Any], int]:
    """An :class:`OptionSpec` converter: an int (decimal, ``0x``, ``0o``) from ``lo`` to
    ``hi`` (no upper bound when None), a power of two when ``pow2``."""
    def convert(v):
        n = int(v, 0) if isinstance(v, str) else int(v)
        if n < lo or (hi is not None and n > hi) or (pow2 and n & (n - 1)):
            kind = "a power of two" if pow2 else "an integer"
            raise ValueError(f"{kind} from {lo}" + (f" to {hi}" if hi is not None else " up"))
        return n
    return convert


#: Options every personality built on ``ufs.vfs`` accepts and passes to it (``lockdep``:
#: lock checking enabled before the mount; ``inode_cache``: the Superblock's inode LRU
#: bound, None for ``ufs.vfs.super.DEFAULT_INODE_CACHE``).
VFS_OPTIONS = MappingProxyType({
    "lockdep": OptionSpec(bool, False, help="check lock order (ufs.vfs.lockdep)"),
    "inode_cache": OptionSpec(int_option(1), None,
                              help="inodes kept in the in-memory inode cache's LRU (default "
                                   "8192; open or dirty inodes are kept beyond it)"),
})


def _callable_or_none(owner: str, what: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise PluginError(f"{owner}: {what} must be callable or None, got {value!r}")


@dataclass(frozen=True, eq=False)
class Personality:
    """A filesystem personality, as registered by ``ufs_register_personalities``.

    :param name: the type name (``-t NAME``): lowercase, ``[a-z][a-z0-9_-]*``, <= 32
        characters; unique across all plugins.
    :param description: one line for ``ufs plugins``.
    :param magic: bytes found at byte ``magic_offset`` of a formatted device (the
        default probe compares them); ``magic_offset + len(magic) <= PROBE_SIZE``.
    :param magic_offset: byte offset of ``magic`` on the device.
    :param probe: optional ``probe(buf: bytes) -> bool`` given the first ``PROBE_SIZE``
        bytes (fewer on a smaller device); replaces the magic comparison.
    :param mkfs: ``mkfs(device, geometry, options)``: format an opened device.
    :param mount: ``mount(device, options, readonly) -> Superblock``-like object.
    :param fsck: ``fsck(device, repair) -> result``; see the personality's docs.
    :param options: ``{name: OptionSpec}`` accepted by :func:`parse_options`.
    :param version: the personality's (or its on-disk format's) version string.
    :param source: the package providing it; filled by the registry when empty.

    ``mkfs``/``mount``/``fsck`` may be ``None`` (operation not supported).  Records are
    frozen and compare by identity.
    """

    name: str
    description: str = ""
    magic: bytes = b""
    magic_offset: int = 0
    probe: Callable[[bytes], bool] | None = None
    mkfs: Callable[..., Any] | None = None
    mount: Callable[..., Any] | None = None
    fsck: Callable[..., Any] | None = None
    options: Mapping[str, OptionSpec] = field(default_factory=dict)
    version: str = ""
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise PluginError(f"personality name {self.name!r} is not [a-z][a-z0-9_-]{{0,31}}")
        who = f"personality {self.name!r}"
        if not isinstance(self.magic, (bytes, bytearray)):
            raise PluginError(f"{who}: magic must be bytes, got {type(self.magic).__name__}")
        object.__setattr__(self, "magic", bytes(self.magic))
        if (not isinstance(self.magic_offset, int) or self.magic_offset < 0
                or self.magic_offset + len(self.magic) > PROBE_SIZE):
            raise PluginError(f"{who}: magic at byte {self.magic_offset!r} (+{len(self.magic)}) "
                              f"is outside the first {PROBE_SIZE} bytes")
        for what in ("probe", "mkfs", "mount", "fsck"):
            _callable_or_none(who, what, getattr(self, what))
        if not isinstance(self.options, Mapping):
            raise PluginError(f"{who}: options must be a mapping of name -> OptionSpec")
        for key, spec in self.options.items():
            if not isinstance(key, str) or not key or "," in key or "=" in key:
                raise PluginError(f"{who}: bad option name {key!r}")
            if not isinstance(spec, OptionSpec):
                raise PluginError(f"{who}: option {key!r} must be an OptionSpec, got {spec!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def matches(self, buf: bytes) -> bool:
        """Does ``buf`` (the start of a device) look formatted by this personality?"""
        if self.probe is not None:
            return bool(self.probe(buf))
        if not self.magic:
            return False
        return bytes(buf[self.magic_offset:self.magic_offset + len(self.magic)]) == self.magic

    def parse_options(self, options: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """:func:`parse_options` for this personality."""
        return parse_options(self, options)


@dataclass(frozen=True, eq=False)
class DeviceType:
    """A block-device backend, as registered by ``ufs_register_devices``.

    :param name: unique backend name (``[a-z][a-z0-9_-]*``).
    :param open: ``open(path, *, read_only=False, **options) -> BlockDev``-like.
    :param description: one line for ``ufs plugins``.
    :param source: the package providing it; filled by the registry when empty.
    """

    name: str
    open: Callable[..., Any]
    description: str = ""
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise PluginError(f"device type name {self.name!r} is not [a-z][a-z0-9_-]{{0,31}}")
        if not callable(self.open):
            raise PluginError(f"device type {self.name!r}: open must be callable")


# --- Options ---

def parse_options(personality: Personality, options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``options`` against ``personality.options``; return every option's value.

    ``options`` is ``"a=1,b,c=x"`` (mount(8) syntax: comma separated, ``key`` alone
    means a true boolean, the last of repeated keys wins), a mapping (values may be
    strings or already-typed values), or ``None``/``""``.  The result holds every
    declared option: given ones converted, the rest at their defaults.

    Raises :class:`OptionError` (EINVAL) naming the unknown option, or the key and value
    of a bad one.
    """
    specs = personality.options
    given: list[tuple[str, Any]] = []
    if options is None:
        pass
    elif isinstance(options, str):
        for item in options.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            given.append((key.strip(), value.strip() if sep else None))
    elif isinstance(options, Mapping):
        given.extend(options.items())
    else:
        raise OptionError(f"options must be a string or a mapping, got {type(options).__name__}")
    out = {key: spec.default for key, spec in specs.items()}
    for key, value in given:
        spec = specs.get(key)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            raise OptionError(f"{personality.name}: unknown option {key!r} (known: {known})")
        out[key] = spec.convert(key, value)
    return out


# --- Probing ---

def read_probe_buffer(device) -> bytes:
    """The first ``PROBE_SIZE`` bytes of ``device`` (fewer if it is smaller), in one read.

    Uses the device's ``pread(length, addr)``; the length is cut to the device size and
    rounded down to its logical block size, because a read past the end of an image is
    EIO (CORE-API §2), never silently short.
    """
    size = getattr(device, "size", PROBE_SIZE)
    lbs = getattr(device, "logical_block_size", 512) or 512
    length = min(PROBE_SIZE, int(size))
    length -= length % lbs
    if length <= 0:
        return b""
    return bytes(device.pread(length, 0))


# --- Registry ---

class Registry(Mapping[str, Personality]):
    """Immutable ``name -> Personality`` mapping (iteration in name order).

    ``devices`` maps backend names to :class:`DeviceType`; ``providers`` and
    ``device_providers`` map each personality / device name to the plugin that
    registered it (empty for records passed in directly).
    """

    __slots__ = ("_personalities", "devices", "providers", "device_providers")

    def __init__(self, personalities: Mapping[str, Personality] | None = None,
                 devices: Mapping[str, DeviceType] | None = None,
                 providers: Mapping[str, str] | None = None,
                 device_providers: Mapping[str, str] | None = None):
        for table, cls in ((personalities or {}, Personality), (devices or {}, DeviceType)):
            for name, record in table.items():
                if not isinstance(record, cls) or record.name != name:
                    raise PluginError(f"registry entry {name!r}: expected a {cls.__name__} named so, "
                                      f"got {record!r}")
        self._personalities = MappingProxyType(dict(sorted((personalities or {}).items())))
        self.devices = MappingProxyType(dict(sorted((devices or {}).items())))
        self.providers = MappingProxyType(dict(providers or {}))
        self.device_providers = MappingProxyType(dict(device_providers or {}))

    def __getitem__(self, name: str) -> Personality:
        return self._personalities[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._personalities)

    def __len__(self) -> int:
        return len(self._personalities)

    def __repr__(self) -> str:
        return f"<Registry personalities={list(self)} devices={list(self.devices)}>"

    def personality(self, name: str) -> Personality:
        """The personality called ``name``; :class:`UnknownTypeError` (ENODEV) if none."""
        try:
            return self._personalities[name]
        except KeyError:
            known = ", ".join(self) or "none registered"
            raise UnknownTypeError(f"unknown filesystem type {name!r} (known: {known})") from None

    def device_type(self, name: str) -> DeviceType:
        """The device backend called ``name``; :class:`UnknownTypeError` (ENODEV) if none."""
        try:
            return self.devices[name]
        except KeyError:
            known = ", ".join(self.devices) or "none registered"
            raise UnknownTypeError(f"unknown device type {name!r} (known: {known})") from None

    def probe(self, device) -> Personality | None:
        """The personality whose probe accepts ``device``, or ``None``.

        Reads the first ``PROBE_SIZE`` bytes once (:func:`read_probe_buffer`) and asks
        every personality's :meth:`Personality.matches`.  More than one match is an
        ambiguous device: :class:`PluginError` naming the candidates (never a guess).
        """
        buf = read_probe_buffer(device)
        hits = [p for p in self._personalities.values() if p.matches(buf)]
        if len(hits) > 1:
            raise PluginError("ambiguous device: it matches personalities "
                              + ", ".join(repr(p.name) for p in hits))
        return hits[0] if hits else None


class RegistryBuilder:
    """Collects ``register(...)`` calls from plugins, then :meth:`build` a :class:`Registry`.

    ``ufs.plugins`` calls each plugin's hook separately with callbacks from
    :meth:`personality_callback` / :meth:`device_callback`, which know the plugin's
    name, so a duplicate is reported naming both plugins.
    """

    def __init__(self):
        self._personalities: dict[str, Personality] = {}
        self._devices: dict[str, DeviceType] = {}
        self._providers: dict[str, str] = {}

    def _add(self, table: dict, kind: str, record, cls: type, plugin: str, package: str) -> None:
        if not isinstance(record, cls):
            raise PluginError(f"plugin {plugin!r} registered {record!r}: expected a {cls.__name__}")
        old = table.get(record.name)
        if old is not None:
            raise PluginError(f"{kind} {record.name!r} is registered twice: by plugin "
                              f"{self._providers[kind + ':' + record.name]!r} and by plugin {plugin!r}")
        if not record.source and package:
            record = replace(record, source=package)
        table[record.name] = record
        self._providers[kind + ":" + record.name] = plugin

    def add_personality(self, personality: Personality, *, plugin: str, package: str = "") -> None:
        """Record ``personality`` from ``plugin`` (raises :class:`PluginError` on a duplicate)."""
        self._add(self._personalities, "personality", personality, Personality, plugin, package)

    def add_device(self, device_type: DeviceType, *, plugin: str, package: str = "") -> None:
        """Record ``device_type`` from ``plugin`` (raises :class:`PluginError` on a duplicate)."""
        self._add(self._devices, "device type", device_type, DeviceType, plugin, package)

    def personality_callback(self, plugin: str, package: str = "") -> Callable[[Personality], None]:
        """The ``register`` argument for ``plugin``'s ``ufs_register_personalities``."""
        def register(personality: Personality) -> None:
            self.add_personality(personality, plugin=plugin, package=package)
        return register

    def device_callback(self, plugin: str, package: str = "") -> Callable[[DeviceType], None]:
        """The ``register`` argument for ``plugin``'s ``ufs_register_devices``."""
        def register(device_type: DeviceType) -> None:
            self.add_device(device_type, plugin=plugin, package=package)
        return register

    def build(self) -> Registry:
        """The frozen registry of everything registered so far."""
        by_kind: dict[str, dict[str, str]] = {"personality": {}, "device type": {}}
        for key, plugin in self._providers.items():
            kind, name = key.split(":", 1)
            by_kind[kind][name] = plugin
        return Registry(self._personalities, self._devices, by_kind["personality"], by_kind["device type"])
