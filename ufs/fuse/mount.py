"""Mounting an image through FUSE: the serving daemon, its start-up handshake and ``umount``.

Layer: top (beside ``ufs.cli``).  Imports ``ufs.api`` (mount), ``ufs.errors``,
``ufs.fuse.adapter`` and, lazily, ``pyfuse3``/``trio`` or the native engine
(``ufs.fuse._lowlevel`` + ``ufs.fuse.native``).  No filesystem logic lives here.

Engines: ``native`` (a libfuse3 low-level session in Cython: kernel-reader threads run the
adapter's handlers inline and serve O_DIRECT reads of fast-path personalities in C without the
GIL; the default when built) or ``pyfuse3`` (trio + a worker-thread hop per request).  Chosen
by ``-o fuse_native``/``-o fuse_pyfuse3`` or ``$UFS_FUSE_ENGINE``; both keep the same life
cycle below.  ``$UFS_FUSE_THREADS``/``$UFS_FUSE_IDLE_THREADS`` size the native worker pool,
``$UFS_FUSE_MAX_BACKGROUND`` (default 64) the async requests the kernel keeps at the daemon.

Life of a mount:
1. :func:`mount_image` (the CLI's ``mount-image``) checks the arguments, then either serves in
   this process (``foreground``) or starts a daemon (``python -m ufs mount-image -f
   --ready-fd N``, in a new session) and waits on a pipe until the daemon says ``ready`` (the
   kernel mount exists) or reports its error.
2. :func:`serve` mounts the image with :func:`ufs.api.mount` (which takes the image's
   exclusive ``flock``), mounts FUSE (``fsname=IMAGE``, ``subtype=ufs-TYPE``), writes a state
   file ``<statedir>/<key>.json`` (pid, image, mountpoint, log) and serves until the kernel
   mount goes away (``umount``/``fusermount3 -u``) or SIGINT/SIGTERM arrives (then it unmounts
   the kernel side itself).  Then it unmounts the Filesystem (sync, ``put_super``, release of
   the image lock), removes the state file and exits.
3. :func:`umount` unmounts the kernel side and waits until the daemon is gone *and* the image
   lock can be taken, so a check right after sees a cleanly closed image.

State directory: ``$UFS_STATE_DIR``, else ``/run/ufs`` as root, else ``$XDG_RUNTIME_DIR/ufs``,
else ``/tmp/ufs-UID``.  The daemon's log (tracebacks of requests that failed with EIO) is
``<statedir>/<key>.log`` unless ``log=`` is given.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from ufs.errors import InvalidError, from_errno

__all__ = ["FUSE_ENGINES", "FUSE_OPTIONS", "find_mount", "fuse_available", "fuse_engine",
           "mount_image", "native_available", "serve", "split_options",
           "state_dir", "umount"]

log = logging.getLogger("ufs.fuse")

#: options the FUSE layer takes (the rest go to the personality / VFS).  The engine is chosen
#: by flags (the CLI's option check only lets FUSE options through without a value):
#: ``fuse_native`` (the libfuse3 session of ufs.fuse._lowlevel; the default when it is built),
#: ``fuse_pyfuse3`` (pyfuse3 on trio) and ``fuse_nofastpath`` (native engine without the C
#: O_DIRECT read path).
FUSE_OPTIONS = ("ro", "rw", "allow_other", "fuse_native", "fuse_pyfuse3", "fuse_nofastpath")
#: the engines: the native libfuse3 session (default when built) or pyfuse3 on trio
FUSE_ENGINES = ("pyfuse3", "native")


def fuse_available() -> str | None:
    """None if a FUSE mount can be made here, else the reason why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        return f"pyfuse3/trio cannot be imported ({e})"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3"
    return None


def state_dir() -> str:
    d = os.environ.get("UFS_STATE_DIR")
    if not d:
        if os.geteuid() == 0:
            d = "/run/ufs"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "ufs")
        else:
            d = f"/tmp/ufs-{os.geteuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _real(mountpoint: str) -> str:
    """The canonical mount point path without touching the mount point itself (a stat of a
    FUSE mount whose daemon is not serving would block): only its parent is resolved."""
    a = os.path.abspath(mountpoint).rstrip("/") or "/"
    if a == "/":
        return a
    return os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))


def _key(mountpoint: str) -> str:
    real = _real(mountpoint)
    h = hashlib.sha1(real.encode()).hexdigest()[:12]
    base = os.path.basename(real.rstrip("/")) or "root"
    return f"{base}-{h}"


def state_path(mountpoint: str) -> str:
    return os.path.join(state_dir(), _key(mountpoint) + ".json")


def default_log_path(mountpoint: str) -> str:
    return os.path.join(state_dir(), _key(mountpoint) + ".log")


def split_options(options) -> tuple[dict, dict]:
    """``"a=1,ro,allow_other"`` → (FUSE options, filesystem options), both {key: value|None}."""
    items: dict = {}
    for part in (options or "").split(",") if isinstance(options, str) else []:
        part = part.strip()
        if part:
            k, sep, v = part.partition("=")
            items[k.strip()] = v.strip() if sep else None
    if isinstance(options, dict):
        items = dict(options)
    fuse = {k: items.pop(k) for k in list(items) if k in FUSE_OPTIONS}
    for k, v in fuse.items():
        if v is not None:
            raise InvalidError(_errno.EINVAL, f"option {k!r} takes no value")
    if "fuse_native" in fuse and "fuse_pyfuse3" in fuse:
        raise InvalidError(_errno.EINVAL, "fuse_native and fuse_pyfuse3 exclude each other")
    return fuse, items


def fuse_engine(fuse_opts: dict) -> str:
    """The engine a mount uses: ``-o fuse_native``/``-o fuse_pyfuse3``, else
    ``$UFS_FUSE_ENGINE``, else native when ``ufs.fuse._lowlevel`` is built, else pyfuse3."""
    if "fuse_native" in fuse_opts:
        return "native"
    if "fuse_pyfuse3" in fuse_opts:
        return "pyfuse3"
    engine = os.environ.get("UFS_FUSE_ENGINE") or (
        "native" if native_available() is None else "pyfuse3")
    if engine not in FUSE_ENGINES:
        raise InvalidError(_errno.EINVAL, f"fuse_engine must be one of {FUSE_ENGINES}")
    return engine


def native_available() -> str | None:
    """None if the native engine (ufs.fuse._lowlevel) is built, else why not."""
    try:
        import ufs.fuse._lowlevel  # noqa: F401
    except ImportError as e:
        return f"ufs.fuse._lowlevel is not built ({e}); needs libfuse3-dev at build time"
    return None


def _unescape_mountinfo(s: str) -> str:
    return (s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def find_mount(mountpoint: str) -> dict | None:
    """The ufs FUSE mount at ``mountpoint`` from ``/proc/self/mountinfo``: {source, fstype}."""
    real = _real(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        if _unescape_mountinfo(fields[4]) == real and rfields[0].startswith("fuse.ufs-"):
            found = {"fstype": rfields[0], "source": _unescape_mountinfo(rfields[1]),
                     "mountpoint": real, "conn": int(fields[2].partition(":")[2])}
    return found


# --- the daemon ----------------------------------------------------------------------------

def _write_state(path, data) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


def serve(image: str, mountpoint: str, options=None, *, log_path: str | None = None,
          ready=None, max_threads: int = 32) -> int:
    """Mount ``image`` at ``mountpoint`` and serve FUSE requests until unmounted or signalled.

    ``ready(msg)`` is called once: ``"ready"`` when the kernel mount exists, or ``"error:
    ..."`` if mounting failed (then the error is raised too).  Returns the exit status.
    """
    import pyfuse3
    import trio

    from ufs import api
    from ufs.fuse.adapter import UfsOperations

    image = os.path.abspath(image)
    mountpoint = _real(mountpoint)
    fuse_opts, fs_opts = split_options(options)
    readonly = "ro" in fuse_opts
    if fuse_engine(fuse_opts) == "native":
        return _serve_native(image, mountpoint, fuse_opts, fs_opts, options,
                             log_path=log_path, ready=ready, max_threads=max_threads)
    log_path = log_path or default_log_path(mountpoint)
    root_log, handler = _open_mount_log(log_path)
    fs = None
    state = None
    spath = state_path(mountpoint)      # before the mount: it resolves the mount point
    mounted_fuse = False
    try:
        try:
            _check_mount_target(image, mountpoint)
            fs = api.mount(image, options=fs_opts, readonly=readonly)
            ops = UfsOperations(fs, max_threads=max_threads)
            args = set(pyfuse3.default_options)
            args.add(f"fsname={image}")
            args.add(f"subtype=ufs-{fs.fstype}")
            if readonly:
                args.add("ro")
            if "allow_other" in fuse_opts:
                args.add("allow_other")
            pyfuse3.init(ops, mountpoint, args)
            mounted_fuse = True
            state = _write_state(spath, {"pid": os.getpid(), "image": image,
                                              "mountpoint": mountpoint, "log": log_path,
                                              "fstype": fs.fstype})
        except BaseException as e:
            if ready is not None:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                where = f": {e.filename}" if getattr(e, "filename", None) else ""
                ready(f"error: {msg}{where}")
            raise
        log.info("mounted %s (%s) at %s, options %s", image, fs.fstype, mountpoint, options)
        if ready is not None:
            ready("ready")
        signalled = []

        async def _main():
            async with trio.open_nursery() as nursery:
                async def watch():
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                        async for signum in sigs:
                            signalled.append(signum)
                            log.info("signal %d: unmounting", signum)
                            pyfuse3.terminate()
                            return
                nursery.start_soon(watch)
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                nursery.cancel_scope.cancel()

        trio.run(_main)
        # the kernel side first (no new requests), then the filesystem
        pyfuse3.close(unmount=bool(signalled))
        mounted_fuse = False
        _report_and_unmount(ops, fs, image, "")
        return 0
    finally:
        if mounted_fuse:
            try:
                pyfuse3.close(unmount=True)
            except Exception:  # pragma: no cover - best effort on the error path
                log.exception("pyfuse3.close failed")
        _release_mount(fs, image, state, root_log, handler)


def _report_and_unmount(ops, fs, image, note: str) -> None:
    """The end of a clean serve, for both engines: what the adapter saw, then the
    filesystem's own unmount (journal flushed / transaction committed)."""
    if ops.requests_failed:
        log.warning("%d requests failed with unexpected errors (see tracebacks above)",
                    ops.requests_failed)
    log.info("requests served concurrently: at most %d at a time%s", ops.max_inflight, note)
    fs.unmount()
    log.info("unmounted %s cleanly", image)


def _open_mount_log(log_path: str):
    """Send the ``ufs`` loggers of this daemon to the mount's log file; returns (logger, handler)
    for _release_mount to detach."""
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_log = logging.getLogger("ufs")
    root_log.addHandler(handler)
    root_log.setLevel(logging.INFO)
    return root_log, handler


def _check_mount_target(image: str, mountpoint: str) -> None:
    """What both engines refuse before opening the image: a ',' in the image path (it would
    split the fsname= mount option), a mount point that is not a directory or is in use."""
    if "," in image:
        raise InvalidError(_errno.EINVAL, "image path may not contain ','")
    if not os.path.isdir(mountpoint):
        raise from_errno(_errno.ENOTDIR, "mount point is not a directory", mountpoint)
    if find_mount(mountpoint) is not None or os.path.ismount(mountpoint):
        raise from_errno(_errno.EBUSY, "something is already mounted there", mountpoint)


def _release_mount(fs, image, state, root_log, handler) -> None:
    """The end of a daemon's life, for either engine, after the FUSE session is closed:
    unmount the filesystem if an error path left it mounted (a clean exit already did), remove
    the state file that `ufs umount` waits on, and detach the mount's log handler."""
    if fs is not None and fs.mounted:
        try:
            fs.unmount()
        except Exception:
            log.exception("unmount of %s failed", image)
    if state is not None:
        try:
            os.unlink(state)
        except FileNotFoundError:
            pass
    root_log.removeHandler(handler)
    handler.close()


def _serve_native(image: str, mountpoint: str, fuse_opts: dict, fs_opts: dict, options, *,
                  log_path: str | None, ready, max_threads: int) -> int:
    """:func:`serve` on the native libfuse3 session (``-o fuse_engine=native``): the same
    life cycle (state file, ready handshake, unmount on signal, clean Filesystem unmount)."""
    from ufs import api
    from ufs.fuse import _lowlevel
    from ufs.fuse.native import NativeOperations

    import pyfuse3

    readonly = "ro" in fuse_opts
    log_path = log_path or default_log_path(mountpoint)
    root_log, handler = _open_mount_log(log_path)
    fs = None
    state = None
    spath = state_path(mountpoint)
    mounted_fuse = False
    try:
        try:
            _check_mount_target(image, mountpoint)
            fs = api.mount(image, options=fs_opts, readonly=readonly)
            ops = NativeOperations(fs, fastpath="fuse_nofastpath" not in fuse_opts)
            args = set(pyfuse3.default_options)
            args.add(f"fsname={image}")
            args.add(f"subtype=ufs-{fs.fstype}")
            if readonly:
                args.add("ro")
            if "allow_other" in fuse_opts:
                args.add("allow_other")
            _lowlevel.mount(ops, mountpoint, args,
                            max_background=int(os.environ.get("UFS_FUSE_MAX_BACKGROUND") or 64))
            mounted_fuse = True
            state = _write_state(spath, {"pid": os.getpid(), "image": image,
                                         "mountpoint": mountpoint, "log": log_path,
                                         "fstype": fs.fstype, "engine": "native"})
        except BaseException as e:
            if ready is not None:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                where = f": {e.filename}" if getattr(e, "filename", None) else ""
                ready(f"error: {msg}{where}")
            raise
        log.info("mounted %s (%s) at %s with the native engine (fast path %s), options %s",
                 image, fs.fstype, mountpoint,
                 ("async" if ops.fast_queue is not None else "sync") if ops.fastpath else "off",
                 options)
        if ready is not None:
            ready("ready")
        # $UFS_FUSE_THREADS / $UFS_FUSE_IDLE_THREADS tune the worker pool (benchmarks).
        # Workers are kept, not reaped when idle: each one owns a device queue (an io_uring
        # ring) and a Python thread state, which a new thread would have to set up again.
        threads = int(os.environ.get("UFS_FUSE_THREADS") or max_threads)
        idle = int(os.environ.get("UFS_FUSE_IDLE_THREADS") or threads)
        # libfuse installs its SIGINT/SIGTERM/SIGHUP handlers (which end the loop) only over
        # SIG_DFL: the loop runs without the GIL, so Python's handlers would never run
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        saved = {s: signal.signal(s, signal.SIG_DFL) for s in sigs}
        try:
            rc = _lowlevel.loop(max_threads=max(1, threads), idle_threads=max(1, idle))
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
        if rc:
            log.info("the native loop ended with %d (a signal, or -errno): unmounting", rc)
        # after a signal the kernel mount is still there: take it down first
        _lowlevel.close(unmount=find_mount(mountpoint) is not None)
        mounted_fuse = False
        log.info("native engine: %s", _lowlevel.stats())
        from ufs.iomap.bdev import thread_queues_made
        log.info("device queues set up by threads: %d", thread_queues_made())
        _report_and_unmount(ops, fs, image, " (Python handlers; fast reads not counted)")
        return 0
    finally:
        if mounted_fuse:
            try:
                _lowlevel.close(unmount=True)
            except Exception:  # pragma: no cover - best effort on the error path
                log.exception("closing the native session failed")
        _release_mount(fs, image, state, root_log, handler)


def mount_image(image: str, mountpoint: str, options=None, *, foreground: bool = False,
                log_path: str | None = None, timeout: float = 60.0, ready=None) -> dict:
    """Mount ``image`` at ``mountpoint``; in the background unless ``foreground``.

    Background: returns ``{"pid", "log", "state"}`` once the mount is ready; raises the
    daemon's error (as an OSError naming it) if it failed.  Foreground: serves until
    unmounted or SIGINT/SIGTERM; ``ready(msg)`` as for :func:`serve`.
    """
    image = os.path.abspath(image)
    mountpoint = os.path.abspath(mountpoint)
    log_path = os.path.abspath(log_path) if log_path else default_log_path(mountpoint)
    if foreground:
        serve(image, mountpoint, options, log_path=log_path, ready=ready)
        return {"pid": os.getpid(), "log": log_path, "state": None}
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "ufs", "mount-image", "-f", "--ready-fd", str(wfd),
           "--log", log_path]
    if options:
        cmd += ["-o", options if isinstance(options, str) else
                ",".join(k if v is None else f"{k}={v}" for k, v in options.items())]
    cmd += [image, mountpoint]
    # the daemon imports this very ufs, whatever its working directory
    import ufs
    env = dict(os.environ)
    top = os.path.dirname(os.path.dirname(os.path.abspath(ufs.__file__)))
    env["PYTHONPATH"] = top + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(wfd,), start_new_session=True, close_fds=True,
                                env=env, cwd="/")
    os.close(wfd)
    msg = b""
    deadline = time.monotonic() + timeout
    try:
        import select
        while time.monotonic() < deadline:
            r, _, _ = select.select([rfd], [], [], 0.2)
            if r:
                chunk = os.read(rfd, 4096)
                if not chunk:
                    break
                msg += chunk
                if msg.endswith(b"\n"):
                    break
            elif proc.poll() is not None:
                break
    finally:
        os.close(rfd)
    text = msg.decode(errors="replace").strip()
    if text != "ready":
        if proc.poll() is None and not text:
            proc.kill()
            proc.wait()
            raise from_errno(_errno.ETIMEDOUT, f"the mount daemon did not start within "
                                               f"{timeout:.0f} s (log: {log_path})")
        proc.wait(timeout=30)
        if text.startswith("error: "):
            raise from_errno(_errno.EIO, text[len("error: "):])
        raise from_errno(_errno.EIO, f"the mount daemon exited with status {proc.returncode} "
                                     f"(log: {log_path})")
    # the daemon serves from now on; the first stat completes the kernel's INIT handshake
    os.stat(mountpoint)
    return {"pid": proc.pid, "log": log_path, "state": state_path(mountpoint)}


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st.rpartition(")")[2].split()[0] not in ("Z", "X")


def _image_free(image: str) -> bool:
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _kernel_umount(mountpoint: str, lazy: bool = False) -> None:
    errs = []
    tool = shutil.which("fusermount3")
    cmds = []
    if tool:
        cmds.append([tool, "-u"] + (["-z"] if lazy else []) + [mountpoint])
    if os.geteuid() == 0 and shutil.which("umount"):
        cmds.append(["umount"] + (["-l"] if lazy else []) + [mountpoint])
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
        errs.append(r.stderr.strip() or f"{cmd[0]} exited {r.returncode}")
    busy = any("busy" in e.lower() for e in errs)
    raise from_errno(_errno.EBUSY if busy else _errno.EIO,
                     "; ".join(errs) or "no unmount tool (fusermount3/umount)", mountpoint)


def umount(mountpoint: str, *, timeout: float = 120.0, lazy: bool = False) -> dict:
    """Unmount a ufs FUSE mount and wait until its image is cleanly closed.

    Returns ``{"image", "pid", "seconds", "daemon_died"}`` (``daemon_died``: the daemon was
    gone before the unmount, e.g. killed: the image was not closed cleanly and the next mount
    recovers it).  EINVAL if nothing of ufs is mounted there; EBUSY
    if the mount is in use; ETIMEDOUT if the daemon has not closed the image in ``timeout``.
    """
    mountpoint = os.path.abspath(mountpoint)
    info = find_mount(mountpoint)
    if info is None:
        raise InvalidError(_errno.EINVAL, "not a ufs mount point", mountpoint)
    spath = state_path(mountpoint)
    state = {}
    try:
        with open(spath) as f:
            state = json.load(f)
    except (OSError, ValueError):
        pass
    pid = state.get("pid")
    image = state.get("image") or info["source"]
    t0 = time.monotonic()
    dead = pid is not None and not _pid_alive(pid)
    _kernel_umount(mountpoint, lazy=lazy)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        daemon_done = pid is None or not _pid_alive(pid) or not os.path.exists(spath)
        if daemon_done and _image_free(image):
            break
        time.sleep(0.02)
    else:
        raise from_errno(_errno.ETIMEDOUT, f"the daemon (pid {pid}) did not close the image "
                                           f"within {timeout:.0f} s", image)
    if pid is not None and not _pid_alive(pid):
        try:        # left behind by a daemon that was killed
            os.unlink(spath)
        except FileNotFoundError:
            pass
    return {"image": image, "pid": pid, "seconds": time.monotonic() - t0, "daemon_died": dead}
