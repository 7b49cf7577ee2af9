"""Metadata lives in setup.cfg; this file only declares the C extension, which setup.cfg
cannot. The extension is optional: without a compiler the mount falls back to its
pure-Python tree decoder (same results, slower on large directories)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kiwi_restore.fuse._treecols", ["fuse/_treecols.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"])])
