"""Compile lurker's per-op hot path with Cython, when Cython and a C compiler are there.

The compiled modules are ordinary Python files; a ``.pxd`` beside each gives Cython the C
types of its classes and locals. Built, a trace spends a fraction of the Python time per
op (docs/tracing.md, "Performance"); where the build fails (no compiler), the same files
run as Python and lurker works unchanged. ``lurker._compiled`` decides at import time.
"""

import os

from setuptools import Extension, setup

# Keep in sync with lurker._compiled.MODULES (a test checks).
MODULES = [
    "lurker.capture._funcs",
    "lurker.capture._recorder",
    "lurker.capture._tree",
    "lurker.graph.nodes",
    "lurker.graph.postprocess",
]


def extensions() -> list[Extension]:
    if os.environ.get("LURKER_NO_COMPILE"):  # the Makefile compiles in a step of its own
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("lurker: Cython is not installed; the hot path stays pure Python")
        return []
    built = []
    for m in MODULES:
        ext = Extension(m, [f"src/{m.replace('.', '/')}.py"], optional=True)
        try:
            built += cythonize(
                [ext],
                language_level=3,
                quiet=True,
                force=True,  # directives are not part of cythonize's up-to-date check
                # Types come from the .pxd files only; the .py annotations are for readers
                # and type checkers, and Python semantics hold wherever no .pxd types a name.
                compiler_directives={
                    "annotation_typing": False,
                    "binding": True,
                    "embedsignature": True,
                },
            )
        except Exception as e:  # a Cython error: that module runs as Python
            print(f"lurker: {m} not compiled ({e}); it runs as Python")
    return built


setup(ext_modules=extensions())
