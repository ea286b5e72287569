"""Tests of the example personality, run from this package (pytest plugins/ufs-example)."""
import pytest

from ufs.errors import NotSupportedError
from ufs.registry import RegistryBuilder
from ufs_example import plugin


def test_example_registers_one_personality():
    builder = RegistryBuilder()
    plugin.ufs_register_personalities(builder.personality_callback("example", "ufs-example"))
    reg = builder.build()
    assert list(reg) == ["example"]
    assert reg["example"].matches(plugin.EXAMPLE_MAGIC + bytes(100))
    with pytest.raises(NotSupportedError):
        reg["example"].mkfs(None, None, {})
