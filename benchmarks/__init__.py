"""Benchmarks: ufs beside fio and the kernel filesystems, in one run, on one image."""
