"""ufs: a userspace filesystem framework built on a Cython reimplementation of the
Linux kernel's iomap layer and direct-I/O engine.

Layer: public API.  Re-exports what users import; see DESIGN.md §6.
"""
__version__ = "0.1.0"
