"""The ``ufs`` command without FUSE: mkfs (flags, YAML profiles, refusal to overwrite), fsck,
info, help texts, and argument errors (one line, exit 2, nothing changed on disk).

Runs the click group in-process (``CliRunner``); every personality the registry offers is
exercised where the behaviour is per-personality.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from ufs.cli import cli
from ufs.plugins import get_registry

PERSONALITIES = sorted(get_registry())


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_error_line(res, *needles):
    """Exit 2 with exactly one line on stderr containing every needle."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- argument errors -------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["mkfs", "-t", "nosuchfs", "-s", "64M"], ["unknown filesystem type 'nosuchfs'"]),
    (["mkfs", "-t", "btrfslike", "-s", "12Q"], ["bad size '12Q'"]),
    (["mkfs", "-t", "btrfslike", "-s", "64M", "-b", "3000"], ["block size"]),
    (["mkfs", "-t", "btrfslike", "-s", "64M", "-o", "bogus=1"], ["unknown option 'bogus'"]),
    (["mkfs", "-t", "btrfslike", "-s", "64M", "-o", "nodesize=3"], ["nodesize"]),
    (["mkfs", "-t", "btrfslike"], ["does not exist", "-s SIZE"]),
    (["mkfs", "-s", "64M"], ["no filesystem type"]),
    (["mkfs", "-t", "btrfslike", "--nonsense"], ["--nonsense"]),
])
def test_mkfs_bad_arguments_exit_2_and_create_nothing(tmp_path, args, needles):
    img = tmp_path / "disk.img"
    res = run(*args, str(img))
    one_error_line(res, *needles)
    assert not img.exists()


@pytest.mark.parametrize("text, needles", [
    ("personality: btrfslike\nsize: [1, 2\n", ["not valid YAML", "line"]),
    ("personality: btrfslike\nsize: 64M\ncolour: blue\n", ["unknown key 'colour'"]),
    ("personality: btrfslike\nsize: lots\n", ["key 'size'", "'lots'"]),
    ("personality: btrfslike\nsize: 64M\nblock_size: 1000\n", ["key 'block_size'"]),
    ("personality: btrfslike\nsize: 64M\noptions: [1, 2]\n", ["key 'options'"]),
    ("personality: btrfslike\nsize: 64M\noptions: {nodesize: 5}\n", ["nodesize"]),
    ("- just\n- a list\n", ["must be a mapping"]),
    ("personality: nosuchfs\nsize: 64M\n", ["unknown filesystem type 'nosuchfs'"]),
])
def test_bad_yaml_profile_exit_2_and_create_nothing(tmp_path, text, needles):
    prof = tmp_path / "p.yaml"
    prof.write_text(text)
    img = tmp_path / "disk.img"
    res = run("mkfs", "--config", str(prof), str(img))
    one_error_line(res, *needles)
    assert not img.exists()


def test_bad_option_on_existing_image_changes_nothing(tmp_path):
    img = tmp_path / "disk.img"
    assert run("mkfs", "-t", "btrfslike", "-s", "64M", str(img)).exit_code == 0
    before = digest(img)
    one_error_line(run("mkfs", "-f", "-t", "btrfslike", "-o", "bogus", str(img)), "bogus")
    one_error_line(run("mount-image", "-o", "dio_complete=sideways", str(img), str(tmp_path)),
                   "dio_complete")
    one_error_line(run("mount-image", "-o", "ro=1", str(img), str(tmp_path)), "'ro'")
    assert digest(img) == before


def test_umount_of_a_non_mount_is_an_operational_error(tmp_path):
    res = run("umount", str(tmp_path))
    assert res.exit_code == 8
    assert "not a ufs mount point" in res.stderr


# --- mkfs / fsck / info ----------------------------------------------------------------------

@pytest.mark.parametrize("fstype", PERSONALITIES)
def test_mkfs_creates_sparse_image_prints_geometry_and_is_clean(tmp_path, fstype):
    img = tmp_path / "disk.img"
    res = run("mkfs", "-t", fstype, "-s", "64M", str(img))
    assert res.exit_code == 0, res.output
    assert f"{fstype} filesystem, 64 MiB, block size 4096" in res.stdout
    st = os.stat(img)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < st.st_size          # sparse: not every block written
    res = run("fsck", "-n", str(img))
    assert res.exit_code == 0, res.output
    assert f"{fstype} clean" in res.stdout
    res = run("info", "--json", str(img))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["personality"] == fstype
    assert info["size"] == 64 << 20
    assert info["block_size"] == 4096
    assert info["clean"] is True
    assert 0 < info["blocks_free"] <= info["blocks"] <= (64 << 20) // 4096
    assert isinstance(info["state"], dict) and isinstance(info["options"], dict)
    # features describe the on-disk format, not mount options
    assert info["features"]["format"] == f"{fstype} v1"
    assert "lockdep" not in info["features"]
    assert 0 < info["blocks_avail"] <= info["blocks_free"]
    res = run("info", str(img))
    assert res.exit_code == 0 and f"personality:  {fstype}" in res.stdout
    assert f"  format: {fstype} v1" in res.stdout


@pytest.mark.parametrize("fstype", PERSONALITIES)
def test_mkfs_refuses_to_overwrite_without_force(tmp_path, fstype):
    img = tmp_path / "disk.img"
    assert run("mkfs", "-t", fstype, "-s", "64M", str(img)).exit_code == 0
    before = digest(img)
    res = run("mkfs", "-t", fstype, "-s", "64M", str(img))
    assert res.exit_code == 8
    assert f"already holds a {fstype} filesystem" in res.stderr and "-f" in res.stderr
    assert digest(img) == before
    res = run("mkfs", "-f", "-t", fstype, "-s", "64M", str(img))
    assert res.exit_code == 0, res.output


def test_mkfs_on_existing_unformatted_file_needs_no_force(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    assert run("mkfs", "-t", "btrfslike", str(img)).exit_code == 0


def test_yaml_profile_used_and_flags_override_it(tmp_path):
    other = [p for p in PERSONALITIES if p != "btrfslike"]
    prof = tmp_path / "p.yaml"
    prof.write_text("personality: btrfslike\nsize: 96M\nblock_size: 4096\n"
                    "options:\n  nodesize: 16384\n")
    img = tmp_path / "a.img"
    res = run("mkfs", "--config", str(prof), str(img))
    assert res.exit_code == 0, res.output
    assert os.stat(img).st_size == 96 << 20
    assert json.loads(run("info", "--json", str(img)).stdout)["personality"] == "btrfslike"
    img2 = tmp_path / "b.img"
    args = ["mkfs", "--config", str(prof), "-s", "80M"]
    if other:
        # -t overrides the profile's personality; the profile's btrfslike options would not
        # fit another personality, so -o overrides them too
        args += ["-t", other[0], "-o", ""]
    res = run(*args, str(img2))
    assert res.exit_code == 0, res.output
    assert os.stat(img2).st_size == 80 << 20
    got = json.loads(run("info", "--json", str(img2)).stdout)["personality"]
    assert got == (other[0] if other else "btrfslike")


def test_fsck_of_unformatted_image_is_operational_error(tmp_path):
    img = tmp_path / "zero.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    res = run("fsck", "-n", str(img))
    assert res.exit_code == 8
    assert len(res.stderr.strip().splitlines()) == 1


def test_fsck_reports_damage_with_exit_1(tmp_path):
    """Scribbling over the used metadata makes fsck -n find problems (exit 1) or refuse the
    image as corrupt (exit 8, one line) - never exit 0, never a traceback."""
    img = tmp_path / "disk.img"
    assert run("mkfs", "-t", "btrfslike", "-s", "64M", str(img)).exit_code == 0
    data = bytearray(open(img, "rb").read(8 << 20))
    # every non-zero 4 KiB block past the probe area (the trees) gets garbage in its middle
    hit = 0
    for off in range(128 << 10, len(data), 4096):
        if any(data[off:off + 4096]):
            data[off + 100:off + 200] = os.urandom(100)
            hit += 1
    assert hit
    with open(img, "r+b") as f:
        f.write(data)
    res = run("fsck", "-n", str(img))
    assert res.exit_code in (1, 8), res.output
    assert "Traceback" not in res.output
    if res.exit_code == 1:
        assert "error:" in res.stdout


@pytest.mark.parametrize("cmd", ["mkfs", "mount-image", "umount", "fsck", "info", "plugins"])
def test_every_command_help_has_examples(cmd):
    res = run(cmd, "--help")
    assert res.exit_code == 0
    assert "Examples:" in res.stdout and f"ufs {cmd}" in res.stdout


def test_top_level_help_lists_commands():
    res = run("--help")
    for cmd in ("mkfs", "mount-image", "umount", "fsck", "info", "plugins", "demo"):
        assert cmd in res.stdout
