"""Plugin hook specifications of ufs (pluggy project name ``"ufs"``).

Layer: plugin machinery.  Imports only pluggy.  Personalities import ``hookimpl`` from
here; nothing else in this module is for them.

Every hook runs at registration or mount time, never on the I/O path (DESIGN.md §2: a
hook call costs microseconds, an O_DIRECT write about ten).  Hooks follow llm's
register-callback pattern: the core passes a ``register`` callable, the plugin calls it
once per thing it provides, and the core (``ufs.registry``) owns the resulting collection,
its validation and its duplicate detection.  Hook results are therefore ignored.

Each hook is documented, with its exact signature, in ``docs/hooks.md``; a test checks
that every hook here has a ``test_hook_<name>`` test and a documentation entry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Callable

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # only for annotations; keeps click and the registry out of the import graph
    import click

    from ufs.registry import DeviceType, Personality

__all__ = ["hookspec", "hookimpl", "ufs_register_personalities", "ufs_register_commands",
           "ufs_register_devices"]

hookspec = HookspecMarker("ufs")
hookimpl = HookimplMarker("ufs")


# --- Registration hooks (called when ufs.plugins builds its registry) ---

@hookspec
def ufs_register_personalities(register: Callable[[Personality], None]) -> None:
    """Register filesystem personalities.

    :param register: call ``register(Personality(...))`` once per personality this
        plugin provides (see :class:`ufs.registry.Personality`).  ``register``
        validates the record at once and raises :class:`ufs.errors.PluginError` for a
        malformed one; the plugin should let that propagate.

    When: each time :func:`ufs.plugins.get_registry` builds a registry, i.e. at
    ``ufs mkfs``/``ufs mount-image``/``ufs.mount()`` time, once per call.  The hook is
    called separately for each plugin so that a name registered twice is reported with
    both plugins' names (:class:`PluginError`).  An implementation must be cheap and
    side-effect free: import the heavy modules of the personality lazily, inside its
    ``mkfs``/``mount`` callables.

    Result: ignored (all implementations are called; return ``None``).
    """


@hookspec
def ufs_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``ufs`` command line.

    :param cli: the top-level :class:`click.Group`.  Add commands with
        ``@cli.command()`` or ``cli.add_command(cmd)``.  Do not remove or replace
        built-in commands; a name collision is the plugin's bug.

    When: once per process, by ``ufs.cli.main`` before it parses the arguments (through
    :func:`ufs.plugins.register_commands`).  Command callbacks run later, only when the
    user invokes them, so import what they need inside the callback.

    Result: ignored (all implementations are called; return ``None``).
    """


@hookspec
def ufs_register_devices(register: Callable[[DeviceType], None]) -> None:
    """Register extra block-device backends by name.

    :param register: call ``register(DeviceType(name=..., open=..., description=...))``
        once per backend (see :class:`ufs.registry.DeviceType`).  ``open(path, *,
        read_only=False, **options)`` must return an object with the
        :class:`ufs.iomap.bdev.BlockDev` interface (a subclass, or a wrapper such as
        ``FaultDev``).  Names are unique across plugins (:class:`PluginError` names both
        plugins otherwise).

    When: each time :func:`ufs.plugins.get_registry` builds a registry; a backend is
    looked up by name when a device is opened, never per I/O.

    Result: ignored (all implementations are called; return ``None``).
    """
