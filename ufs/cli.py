"""The `ufs` command (also `python -m ufs`).

Layer: top.  Parses arguments, calls the public API, prints.  Nothing else lives here: no
filesystem logic, no I/O beyond what the called functions do.  Plugins may add commands through
the `ufs_register_commands(cli)` hook.

Exit codes: 0 success, 1 the operation found problems (fsck), 2 usage errors (click's own),
8 operational errors (an OSError from the library, printed as one line).
"""
from __future__ import annotations

import json
import os
import sys

import click

EXIT_OPERATIONAL = 8


EXIT_USAGE = 2


class _Group(click.Group):
    """Turns errors into one clear line: usage errors (click's, bad options, bad profiles)
    exit 2, library errors (OSError) exit 8, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            name = e.ctx.command_path if e.ctx is not None else "ufs"
            click.echo(f"{name}: error: {e.format_message()} (see '{name} --help')", err=True)
            sys.exit(EXIT_USAGE)
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"ufs: {e.strerror or e}{where}", err=True)
            sys.exit(EXIT_OPERATIONAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ufs", prog_name="ufs")
def cli():
    """ufs: a userspace filesystem framework on a Cython iomap + direct-I/O engine.

    \b
    Examples:
      ufs plugins                        list personalities and plugins
      ufs mkfs -t btrfslike -s 512M disk.img
      ufs mount-image disk.img /mnt/ufs  serve it through FUSE (background)
      ufs umount /mnt/ufs                unmount, wait for a clean close
      ufs fsck -n disk.img               check without repairing
      ufs info --json disk.img
      ufs demo                           run the main job on a scratch image
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins(as_json):
    """List every loaded plugin and the personalities it registers.

    \b
    Examples:
      ufs plugins
      ufs plugins --json | jq '.[].name'
    """
    from ufs import plugins as _plugins

    rows = _plugins.get_plugins()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no plugins loaded")
        return
    for r in rows:
        names = ", ".join(r.get("personalities", [])) or "-"
        click.echo(f"{r['name']:<24} {r.get('version') or '':<10} personalities: {names}")


@cli.command()
@click.option("--image", default=None, metavar="PATH",
              help="Image file to use (default: a scratch file under the current directory, removed after).")
@click.option("--size", default="256M", show_default=True, help="Image size (K/M/G suffixes).")
@click.option("-t", "--type", "fstype", default="btrfslike", show_default=True, metavar="TYPE",
              help="Personality for the FUSE flow.")
@click.option("--engine", is_flag=True,
              help="Run the engine demonstration instead of the FUSE flow.")
def demo(image, size, fstype, engine):
    """Run the main job on a default image and print what it did.

    Where FUSE works (root, /dev/fuse, pyfuse3): mkfs, mount-image, copy a tree in
    and compare it, a short fio --direct=1 verify job through the mount, umount,
    fsck (must be clean), mount again and compare.  Otherwise (or with --engine)
    it demonstrates the engine: O_DIRECT writes and reads through dio_rw, the split
    dio_start/dio_complete API, asynchronous submission at queue depth, and the
    seed's O_DSYNC deadlock reproduced as EDEADLK under lockdep.

    \b
    Examples:
      ufs demo
      ufs demo -t xfslike --size 512M
      ufs demo --engine --image /tmp/demo.img --size 1G
    """
    from ufs import demo as _demo

    _demo.run(image=image, size=size, echo=click.echo, engine=engine, fstype=fstype)


# --- filesystem commands ----------------------------------------------------------------------

def _usage(msg: str):
    raise click.UsageError(msg, click.get_current_context(silent=True))


def _personality(name: str):
    """The registered personality ``name`` or a usage error listing the known ones."""
    from ufs.plugins import get_registry

    reg = get_registry()
    if name not in reg:
        _usage(f"unknown filesystem type {name!r} (known: {', '.join(sorted(reg)) or 'none'})")
    return reg[name]


def _check_options(pers, options, *, mkfs: bool) -> None:
    """Validate ``-o`` against the personality before anything touches the disk (exit 2)."""
    from ufs.api import _VFS_OPTIONS
    from ufs.errors import PluginError
    from ufs.registry import parse_options

    opts = dict(options) if isinstance(options, dict) else {}
    if isinstance(options, str):
        for item in options.split(","):
            item = item.strip()
            if item:
                k, sep, v = item.partition("=")
                opts[k.strip()] = v.strip() if sep else None
    if not mkfs:
        from ufs.fuse.mount import FUSE_OPTIONS
        for k in list(opts):
            if k in FUSE_OPTIONS:
                if opts.pop(k) is not None:
                    _usage(f"option {k!r} takes no value")
    for k in _VFS_OPTIONS:
        if k in opts and k not in pers.options:
            opts.pop(k)
    try:
        parse_options(pers, opts)
    except (PluginError, OSError) as e:
        _usage(str(getattr(e, "strerror", None) or e))


def _parse_size_arg(value, what: str) -> int:
    from ufs.api import parse_size
    try:
        n = parse_size(value)
    except OSError:
        _usage(f"bad {what} {value!r} (e.g. 4096, 64K, 512M, 2G)")
    if n <= 0:
        _usage(f"bad {what} {value!r}: must be positive")
    return n


def _human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"


class _Status:
    """A one-line status on a terminal (stdout is a TTY), silent in pipes."""

    def __init__(self, text: str):
        self.text = text
        self.tty = sys.stdout.isatty()

    def __enter__(self):
        if self.tty:
            click.echo(f"{self.text}...", nl=False)
        return self

    def __exit__(self, *exc):
        if self.tty:
            click.echo("\r\033[K", nl=False)


def _probe_image(path: str):
    """The personality formatted on ``path`` or None (reads the first blocks, O_DIRECT)."""
    from ufs.iomap.bdev import open_device
    from ufs.plugins import get_registry

    with open_device(path, read_only=True) as dev:
        return get_registry().probe(dev)


def _geometry(image: str) -> dict:
    """Personality, size and usage of a formatted image (mounted read-only for statfs)."""
    from ufs import api

    with api.mount(image, readonly=True) as fs:
        st = fs.statvfs()
        info = {"image": os.path.abspath(image), "personality": fs.fstype,
                "version": getattr(fs.personality, "version", ""),
                "description": getattr(fs.personality, "description", ""),
                "size": os.stat(image).st_size if os.path.isfile(image) else
                getattr(fs.sb.bdev, "size", None),
                "block_size": fs.sb.s_blocksize, "blocks": st.f_blocks, "blocks_free": st.f_bfree,
                "blocks_avail": st.f_bavail, "files": st.f_files, "files_free": st.f_ffree,
                "max_name": st.f_namemax}
        extra = getattr(fs.sb, "info", None)
        if callable(extra):
            try:
                info["state"] = dict(extra())
            except Exception as e:  # noqa: BLE001 - informational only
                info["state"] = {"error": str(e)}
        feats = getattr(fs.sb, "features", None)
        info["features"] = dict(feats()) if callable(feats) else {}
        info["options"] = {k: spec.default for k, spec in fs.personality.options.items()}
    return info


class _WithPersonalityOptions(click.Command):
    """A command whose --help ends with every registered personality's ``-o`` options
    (read from the registry when help is shown, so plugins' options appear too)."""

    def format_epilog(self, ctx, formatter):
        super().format_epilog(ctx, formatter)
        try:
            from ufs.plugins import get_registry
            reg = get_registry()
        except Exception:  # noqa: BLE001 - help must print even if a plugin is broken
            return
        with formatter.section("Personality options (-o)"):
            for name in sorted(reg):
                pers = reg[name]
                rows = []
                for key, spec in pers.options.items():
                    choices = f" ({'|'.join(map(str, spec.choices))})" if spec.choices else ""
                    rows.append((f"{key}={spec.default}", f"{spec.help}{choices}"))
                formatter.write_text(f"{name}: {pers.description}")
                with formatter.indentation():
                    formatter.write_dl(rows or [("-", "no options")])
        if self.name == "mount-image":
            with formatter.section("FUSE options (-o)"):
                formatter.write_dl([("ro", "read-only mount"),
                                    ("allow_other", "let other users access the mount")])


@cli.command(cls=_WithPersonalityOptions)
@click.option("-t", "--type", "fstype", metavar="TYPE",
              help="Personality (see 'ufs plugins'); required unless the profile names one.")
@click.option("-s", "--size", metavar="SIZE",
              help="Image size: bytes or K/M/G/T suffix (512M, 2G). Required to create a "
                   "missing image; an existing image file is resized to it.")
@click.option("-b", "--block-size", "block_size", metavar="BYTES",
              help="Filesystem block size, a power of two  [default: 4096]")
@click.option("-o", "--options", metavar="OPT[,OPT...]",
              help="Personality mkfs options, e.g. nodesize=16384.")
@click.option("--config", "config", metavar="FILE.yaml", type=click.Path(dir_okay=False),
              help="YAML profile with keys personality, size, block_size, options; flags "
                   "given on the command line override it.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing ufs filesystem.")
@click.argument("image", type=click.Path(dir_okay=False))
def mkfs(fstype, size, block_size, options, config, force, image):
    """Format IMAGE (an image file, created sparse if missing, or a block device).

    Refuses to overwrite an image that already holds a ufs filesystem unless -f is given.
    Prints the resulting geometry.

    \b
    Examples:
      ufs mkfs -t btrfslike -s 512M disk.img
      ufs mkfs -t xfslike -s 2G -b 4096 -f disk.img
      ufs mkfs -t btrfslike -o nodesize=16384 disk.img
      ufs mkfs --config profile.yaml -s 1G disk.img
    \b
    Profile (FILE.yaml):
      personality: btrfslike
      size: 512M
      block_size: 4096
      options: {nodesize: 16384}
    """
    from ufs import api
    from ufs.config import ConfigError, load_mkfs_profile

    profile = {}
    if config:
        try:
            profile = load_mkfs_profile(config)
        except ConfigError as e:
            _usage(e.strerror or str(e))
    fstype = fstype or profile.get("personality")
    if not fstype:
        _usage("no filesystem type: give -t TYPE (or 'personality:' in the profile)")
    pers = _personality(fstype)
    size_b = _parse_size_arg(size, "size") if size is not None else profile.get("size")
    bs = _parse_size_arg(block_size, "block size") if block_size is not None else \
        profile.get("block_size", 4096)
    if bs < 512 or bs & (bs - 1):
        _usage(f"bad block size {bs}: must be a power of two, at least 512")
    opts = options if options is not None else profile.get("options")
    _check_options(pers, opts, mkfs=True)
    exists = os.path.exists(image)
    if not exists and size_b is None:
        _usage(f"{image} does not exist: give -s SIZE to create it")
    if exists and not force:
        st = os.stat(image)
        if st.st_size:
            try:
                found = _probe_image(image)
            except OSError:
                found = None
            if found is not None:
                from ufs.errors import from_errno
                raise from_errno(17, f"{image} already holds a {found.name} filesystem; "
                                     "use -f to overwrite it")
    try:
        with _Status(f"formatting {image} as {fstype}"):
            api.mkfs(image, fstype, size=size_b, block_size=bs, options=opts)
    except BaseException:
        if not exists:
            try:
                os.unlink(image)
            except OSError:
                pass
        raise
    g = _geometry(image)
    click.echo(f"{image}: {g['personality']} filesystem, {_human(g['size'] or 0)}, "
               f"block size {g['block_size']}, {g['blocks']} blocks ({g['blocks_free']} free)")


@cli.command("mount-image", cls=_WithPersonalityOptions)
@click.option("-o", "--options", metavar="OPT[,OPT...]",
              help="Mount options: the personality's (e.g. dio_complete=marker, lockdep) "
                   "and ro, allow_other.")
@click.option("-f", "--foreground", is_flag=True,
              help="Serve in the foreground; Ctrl-C unmounts cleanly.")
@click.option("--log", "log_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Daemon log (errors with tracebacks) [default: <statedir>/<mountpoint>.log]")
@click.option("--ready-fd", type=int, hidden=True)
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
def mount_image(options, foreground, log_path, ready_fd, image, mountpoint):
    """Mount IMAGE at MOUNTPOINT through FUSE (pyfuse3, libfuse 3).

    Returns once the mount is ready and keeps serving in the background; 'ufs umount'
    ends it.  The mount shows in mount(8)/df with IMAGE as its source and type
    fuse.ufs-TYPE.  O_DIRECT opens go to the ufs direct-I/O engine; other opens use the
    personality's buffered path.

    \b
    Examples:
      ufs mount-image disk.img /mnt/ufs
      ufs mount-image -o ro,allow_other disk.img /mnt/ufs
      ufs mount-image -o dio_complete=marker,lockdep disk.img /mnt/ufs
      ufs mount-image -f disk.img /mnt/ufs      # foreground; Ctrl-C unmounts
    """
    from ufs.fuse import mount as fmount

    if ready_fd is not None:
        # the daemon started by a background mount-image: report to the waiting parent
        wf = os.fdopen(ready_fd, "w")

        def ready(msg):
            try:
                wf.write(msg + "\n")
                wf.flush()
                wf.close()
            except OSError:
                pass
        try:
            sys.exit(fmount.serve(image, mountpoint, options, log_path=log_path, ready=ready))
        except OSError:
            sys.exit(EXIT_OPERATIONAL)
    if not os.path.exists(image):
        from ufs.errors import from_errno
        raise from_errno(2, "no such image", image)
    if not os.path.isdir(mountpoint):
        from ufs.errors import from_errno
        raise from_errno(20, "mount point is not a directory", mountpoint)
    pers = _probe_image(image)
    if pers is None:
        from ufs.errors import from_errno
        raise from_errno(22, "no ufs filesystem on this image (run 'ufs mkfs')", image)
    _check_options(pers, options, mkfs=False)
    why = fmount.fuse_available()
    if why:
        from ufs.errors import from_errno
        raise from_errno(19, f"FUSE is not available here: {why}")
    def ready(msg):
        if msg == "ready":
            click.echo(f"serving {image} ({pers.name}) at {mountpoint}; Ctrl-C unmounts",
                       err=True)

    res = fmount.mount_image(image, mountpoint, options, foreground=foreground,
                             log_path=log_path, ready=ready if foreground else None)
    if not foreground:
        click.echo(f"mounted {image} ({pers.name}) at {mountpoint} (daemon pid {res['pid']}, "
                   f"log {res['log']})")


@cli.command()
@click.option("--timeout", default=120.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the daemon to close the image.")
@click.option("-l", "--lazy", is_flag=True, help="Detach now even if busy (umount -l).")
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(timeout, lazy, mountpoint):
    """Unmount a 'ufs mount-image' mount and wait until the image is cleanly closed.

    Returns when the daemon has synced the filesystem, released the image and exited, so
    'ufs fsck' right after sees a clean image.

    \b
    Examples:
      ufs umount /mnt/ufs
      ufs umount /mnt/ufs && ufs fsck -n disk.img
    """
    from ufs.fuse import mount as fmount

    res = fmount.umount(mountpoint, timeout=timeout, lazy=lazy)
    if res["daemon_died"]:
        click.echo(f"unmounted {mountpoint}; its daemon (pid {res['pid']}) had died, so "
                   f"{res['image']} was not closed cleanly: the next mount recovers it")
    else:
        click.echo(f"unmounted {mountpoint}; {res['image']} closed cleanly "
                   f"({res['seconds']:.2f} s)")


@cli.command()
@click.option("-n", "--no-repair", "no_repair", is_flag=True,
              help="Only check; change nothing on the image.")
@click.argument("image", type=click.Path(dir_okay=False))
def fsck(no_repair, image):
    """Check (and without -n repair) the filesystem on IMAGE.

    Prints each problem with its location.  Exit status: 0 clean, 1 problems found (or
    fixed, without -n), 8 operational error (e.g. the image is mounted or unreadable).

    \b
    Examples:
      ufs fsck -n disk.img
      ufs fsck disk.img || echo "problems found (and repaired)"
    """
    from ufs import api

    with _Status(f"checking {image}"):
        report = api.fsck(image, repair=not no_repair)
    for err in report.errors:
        click.echo(f"error: {err}")
    for fix in report.repaired:
        click.echo(f"repaired: {fix}")
    if report.clean:
        click.echo(f"{image}: {report.fstype} clean")
        return
    click.echo(f"{image}: {report.fstype}: {len(report.errors)} problem(s)"
               + (f", {len(report.repaired)} repaired" if report.repaired else ""))
    sys.exit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.argument("image", type=click.Path(dir_okay=False))
def info(as_json, image):
    """Show the personality, geometry, usage, features and state of IMAGE.

    State comes from a read-only check (like 'ufs fsck -n'): clean or not, and the
    personality's counters (generation, journal/log state...).

    \b
    Examples:
      ufs info disk.img
      ufs info --json disk.img | jq .blocks_free
    """
    from ufs import api

    with _Status(f"reading {image}"):
        g = _geometry(image)
        report = api.fsck(image, repair=False)
    g["clean"] = report.clean
    g["problems"] = list(report.errors)
    g.setdefault("state", {}).update({k: v for k, v in report.stats.items()})
    if as_json:
        click.echo(json.dumps(g, indent=2, default=str))
        return
    used = (g["blocks"] - g["blocks_free"]) * g["block_size"]
    click.echo(f"image:        {g['image']}")
    click.echo(f"personality:  {g['personality']} {g['version']} - {g['description']}")
    click.echo(f"size:         {_human(g['size'] or 0)} ({g['size']} bytes)")
    click.echo(f"block size:   {g['block_size']}")
    click.echo(f"blocks:       {g['blocks']} total, {g['blocks_free']} free, "
               f"{_human(used)} used")
    if g["files"]:
        click.echo(f"inodes:       {g['files']} total, {g['files_free']} free")
    click.echo("features:     " + ("" if g["features"] else "-"))
    for k, v in g["features"].items():
        click.echo(f"  {k}: {v}")
    click.echo("options (defaults): "
               + (", ".join(f"{k}={v}" for k, v in g["options"].items()) or "-"))
    click.echo(f"state:        {'clean' if g['clean'] else 'NOT clean'}")
    for k, v in g["state"].items():
        click.echo(f"  {k}: {v}")
    for p in g["problems"]:
        click.echo(f"  problem: {p}")


def main(argv=None):
    """Console-script entry point."""
    try:
        from ufs import plugins as _plugins

        _plugins.register_commands(cli)
    except ImportError:  # pragma: no cover - plugins module always present in a build
        pass
    cli.main(args=argv, prog_name="ufs")
