"""The `ufs` command (also `python -m ufs`).

Layer: top.  Parses arguments, calls the public API, prints.  Nothing else lives here: no
filesystem logic, no I/O beyond what the called functions do.  Plugins may add commands through
the `ufs_register_commands(cli)` hook.

Exit codes: 0 success, 1 the operation found problems (fsck), 2 usage errors (click's own),
8 operational errors (an OSError from the library, printed as one line).
"""
from __future__ import annotations

import json
import sys

import click

EXIT_OPERATIONAL = 8


class _Group(click.Group):
    """Turns library errors into one clear line and exit code 8 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
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
      ufs plugins                 list personalities and plugins
      ufs demo                    run the engine demonstration on a scratch image
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
def demo(image, size):
    """Run the main job on a default image and print what it did.

    Until the personalities exist this demonstrates the engine: O_DIRECT
    writes and reads through dio_rw on an identity-mapped file, the split
    dio_start/dio_complete API, asynchronous submission at queue depth, and the
    seed's O_DSYNC deadlock reproduced as EDEADLK under lockdep.

    \b
    Examples:
      ufs demo
      ufs demo --image /tmp/demo.img --size 1G
    """
    from ufs import demo as _demo

    _demo.run(image=image, size=size, echo=click.echo)


def main(argv=None):
    """Console-script entry point."""
    try:
        from ufs import plugins as _plugins

        _plugins.register_commands(cli)
    except ImportError:  # pragma: no cover - plugins module always present in a build
        pass
    cli.main(args=argv, prog_name="ufs")
