"""ufs.testing: the public test kit.

Owns the pure-Python reference DIO engine (``reference``: the oracle for differential tests),
the ``layoutfs`` test personality (a file whose layout is given explicitly), the expected-state
model (``model``) and Hypothesis strategies (``strategies``).

May import ``ufs.iomap``, ``ufs.vfs`` and ``ufs.errors``.  Nothing here is imported by the rest
of ufs; import the submodules directly (``from ufs.testing import reference``).
"""
