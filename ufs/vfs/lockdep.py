"""Lock-dependency checking ("lockdep") and the hung-task watchdog for ufs.vfs locks.

Layer: vfs (bottom of it).  Imports only ``ufs.errors`` and the standard library.

What it owns:
- the global on/off switch (``enable()``, ``disable()``, ``enabled()``, ``checking()``;
  the environment variable ``UFS_LOCKDEP=1`` turns it on at import time);
- lock classes, keyed by ``(name, subclass)`` as the kernel keys them by lock_class_key and
  nesting subclass (``inode.i_rwsem/1`` is the child of a rename);
- each thread's stack of held locks with the site (a short stack) of every acquisition;
- the dependency graph between classes: taking B while holding A records the edge A->B and the
  two sites that made it;
- the watchdog settings (``hung_task_timeout``, ``hung_task_panic``; environment
  ``UFS_HUNG_TASK_TIMEOUT`` seconds and ``UFS_HUNG_TASK_PANIC=1``) and the report it logs on the
  logger ``ufs.vfs.lockdep``.

Rules, as Linux lockdep applies them to sleeping locks:
- A blocking acquisition of a class the thread already holds (any mode; rwsems are not
  recursive-read safe once a writer queues) raises :class:`~ufs.errors.DeadlockError` at once.
  Locks of one class taken together need distinct subclasses (``down_write_nested``).
- Before a blocking acquisition of B, for every held A: if a path B ->* A exists in the graph
  (seen on any thread, ever), raise DeadlockError ("possible circular locking dependency")
  with the sites of every edge on that path and of the current attempt; else record A->B.
- Trylocks never block, so they add no dependency and never raise; a lock taken by trylock
  is still held, and blocking acquisitions made while it is held depend on it.
- Checks run *before* the thread blocks, so an ABBA race reports instead of hanging.

Locks: one internal ``threading.Lock`` (``_graph_lock``) guards the class table and the graph; it
is a leaf, never held while calling out.  Held stacks are thread-local and need no lock.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

from ufs.errors import DeadlockError

__all__ = [
    "enable", "disable", "enabled", "checking", "reset", "LockClass", "lock_class",
    "READ", "WRITE", "HeldLock", "held_locks", "Watchdog", "watchdog", "hung_task",
    "format_site", "capture_site", "log",
]

log = logging.getLogger("ufs.vfs.lockdep")

READ = 1
WRITE = 2
_MODE_NAME = {READ: "read", WRITE: "write"}

#: frames kept per acquisition site
SITE_DEPTH = 8

# The switch is a module global read on every acquisition (one dict lookup).
_on: bool = os.environ.get("UFS_LOCKDEP", "0") not in ("", "0", "no", "off", "false")


def enable() -> None:
    """Turn lock-dependency checking on for locks acquired from now on."""
    global _on
    _on = True


def disable() -> None:
    """Turn checking off (locks already held stay tracked until released)."""
    global _on
    _on = False


def enabled() -> bool:
    """Whether checking is on."""
    return _on


@contextlib.contextmanager
def checking(on: bool = True, *, fresh: bool = False):
    """Run a block with checking on (or off) and restore the previous state.

    ``fresh=True`` also starts from an empty dependency graph and restores the old
    graph afterwards, so a test that provokes an inversion on purpose leaves no edge behind.
    """
    global _on
    old = _on
    saved = None
    if fresh:
        with _graph_lock:
            saved = {k: dict(v) for k, v in _graph.items()}
            _graph.clear()
    _on = on
    try:
        yield
    finally:
        _on = old
        if saved is not None:
            with _graph_lock:
                _graph.clear()
                _graph.update(saved)


def reset() -> None:
    """Forget every recorded dependency (classes stay interned)."""
    with _graph_lock:
        _graph.clear()


# --- Sites -------------------------------------------------------------------------------------

def capture_site(frame, depth: int = SITE_DEPTH) -> tuple:
    """Freeze a short stack starting at ``frame``: ((filename, lineno, function), ...)."""
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return tuple(out)


def format_site(site, indent: str = "    ") -> str:
    """Render a site from :func:`capture_site` (or a live ``(frame, lineno)`` pair)."""
    if site is None:
        return f"{indent}<unknown site>"
    if isinstance(site, tuple) and len(site) == 2 and not isinstance(site[0], tuple):
        frame, lineno = site            # a live site kept by a lock with checking off
        frames = capture_site(frame)
        if frames:
            frames = ((frames[0][0], lineno, frames[0][2]),) + frames[1:]
        site = frames
    return "\n".join(f'{indent}File "{f}", line {n}, in {fn}' for f, n, fn in site)


# --- Classes and held locks ----------------------------------------------------------------------

class LockClass:
    """One lock class: every lock built with the same name and taken with the same subclass."""

    __slots__ = ("name", "subclass", "key")

    def __init__(self, name: str, subclass: int):
        self.name = name
        self.subclass = subclass
        self.key = (name, subclass)

    def __repr__(self) -> str:
        return self.name if self.subclass == 0 else f"{self.name}/{self.subclass}"

    __str__ = __repr__


_graph_lock = threading.Lock()
_classes: dict[tuple, LockClass] = {}
# _graph[A][B] = (site where A was taken, site where B was taken, thread name): A held, then B.
_graph: dict[LockClass, dict[LockClass, tuple]] = {}


def lock_class(name: str, subclass: int = 0) -> LockClass:
    """The interned class for ``(name, subclass)``."""
    key = (name, subclass)
    cls = _classes.get(key)
    if cls is None:
        with _graph_lock:
            cls = _classes.setdefault(key, LockClass(name, subclass))
    return cls


class HeldLock:
    """One acquisition on a thread's held stack."""

    __slots__ = ("lock", "cls", "mode", "site", "trylock", "thread")

    def __init__(self, lock, cls: LockClass, mode: int, site: tuple, trylock: bool):
        self.lock = lock
        self.cls = cls
        self.mode = mode
        self.site = site
        self.trylock = trylock
        self.thread = threading.current_thread().name

    def __repr__(self) -> str:
        return f"<held {self.cls} ({_MODE_NAME[self.mode]}) by {self.thread}>"


_tls = threading.local()


def _held() -> list:
    try:
        return _tls.held
    except AttributeError:
        _tls.held = []
        return _tls.held


def held_locks() -> list:
    """The calling thread's held stack (a copy), oldest first."""
    return list(_held())


def _desc(cls, mode) -> str:
    return f"{cls} ({_MODE_NAME[mode]})"


def check_acquire(lock, cls: LockClass, mode: int, site: tuple) -> None:
    """Validate a *blocking* acquisition before the thread may block; record its dependencies.

    Raises DeadlockError for recursion on the class or for an order that closes a cycle.
    """
    held = _held()
    if not held:
        return
    me = threading.current_thread().name
    for h in held:
        if h.cls is cls or h.lock is lock:     # the same lock under another subclass too
            same = "the same lock" if h.lock is lock else "another lock of the same class"
            raise DeadlockError(
                f"possible recursive locking detected: thread {me!r} is trying to acquire "
                f"{_desc(cls, mode)} while already holding {same}, {_desc(h.cls, h.mode)}"
                f" (use a nesting subclass if this is intended)\n"
                f"  lock {cls} held since:\n{format_site(h.site)}\n"
                f"  being acquired again at:\n{format_site(site)}")
    for h in held:
        deps = _graph.get(h.cls)
        if deps is not None and cls in deps:
            continue                    # already validated when this edge was first recorded
        with _graph_lock:
            path = _find_path(cls, h.cls)
            if path is None:
                _graph.setdefault(h.cls, {})[cls] = (h.site, site, me)
                continue
        raise DeadlockError(_circular_report(me, h, cls, mode, site, path))


def _find_path(src: LockClass, dst: LockClass):
    """Edges of a path src ->* dst in the graph, or None.  Caller holds _graph_lock."""
    parent = {src: None}
    todo = [src]
    while todo:
        node = todo.pop()
        for nxt in _graph.get(node, ()):
            if nxt in parent:
                continue
            parent[nxt] = node
            if nxt is dst:
                edges = []
                while parent[nxt] is not None:
                    edges.append((parent[nxt], nxt))
                    nxt = parent[nxt]
                return edges[::-1]
            todo.append(nxt)
    return None


def _circular_report(me: str, h: HeldLock, cls: LockClass, mode: int, site, path) -> str:
    lines = [
        "possible circular locking dependency detected",
        f"thread {me!r} is trying to acquire {_desc(cls, mode)} "
        f"while holding {_desc(h.cls, h.mode)},",
        f"but the reverse order {' -> '.join([str(path[0][0])] + [str(b) for _, b in path])}"
        " was recorded before:",
    ]
    for a, b in path:
        a_site, b_site, thread = _graph[a][b]
        lines.append(f"  [{thread}] held {a} taken at:\n{format_site(a_site)}")
        lines.append(f"  [{thread}] then acquired {b} at:\n{format_site(b_site)}")
    lines.append(f"  [{me}] now holding {h.cls} taken at:\n{format_site(h.site)}")
    lines.append(f"  [{me}] and acquiring {cls} at:\n{format_site(site)}")
    return "\n".join(lines)


def acquired(lock, cls: LockClass, mode: int, site: tuple, trylock: bool) -> HeldLock:
    """Push a successful acquisition on the calling thread's held stack."""
    h = HeldLock(lock, cls, mode, site, trylock)
    _held().append(h)
    return h


def released(h: HeldLock) -> None:
    """Pop ``h`` from the calling thread's held stack (releases may be out of order)."""
    held = _held()
    for i in range(len(held) - 1, -1, -1):
        if held[i] is h:
            del held[i]
            return


# --- Hung-task watchdog ---------------------------------------------------------------------------

def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class Watchdog:
    """Hung-task settings shared by every lock that does not override them.

    ``hung_task_timeout``: seconds a waiter may block before a report is logged
    (0 or None disables).  ``hung_task_panic``: raise DeadlockError in the waiter instead
    of waiting on after the report.
    """

    def __init__(self):
        self.hung_task_timeout = _env_float("UFS_HUNG_TASK_TIMEOUT", 120.0) or None
        self.hung_task_panic = os.environ.get("UFS_HUNG_TASK_PANIC", "0") not in ("", "0")
        self.reports = 0                # how many hung-task reports were logged


watchdog = Watchdog()


@contextlib.contextmanager
def hung_task(timeout: float | None, panic: bool = False):
    """Temporarily set the global watchdog (for tests)."""
    old = (watchdog.hung_task_timeout, watchdog.hung_task_panic)
    watchdog.hung_task_timeout, watchdog.hung_task_panic = timeout, panic
    try:
        yield watchdog
    finally:
        watchdog.hung_task_timeout, watchdog.hung_task_panic = old


def hung_task_report(lock, mode: int, waited_s: float, wait_frame, holders) -> str:
    """Log (and return) the report for a waiter blocked for ``waited_s`` seconds.

    ``holders`` is a list of ``(thread_ident, mode, site)``.
    """
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.current_thread()
    lines = [f"INFO: task {me.name!r} blocked for more than {waited_s:.1f} seconds "
             f"waiting for {lock.name} ({_MODE_NAME[mode]})",
             "  waiting at:", format_site(capture_site(wait_frame))]
    if not holders:
        lines.append("  no recorded holder (taken by a non-owner acquisition)")
    for ident, hmode, site in holders:
        lines.append(f"  held ({_MODE_NAME[hmode]}) by thread {names.get(ident, ident)!r}, "
                     "acquired at:")
        lines.append(format_site(site))
        frame = sys._current_frames().get(ident)
        if frame is not None:
            lines.append("  that thread is now at:")
            lines.append(format_site(capture_site(frame)))
    text = "\n".join(lines)
    watchdog.reports += 1
    log.error("%s", text)
    return text
