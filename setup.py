"""Build glue for the optional compiled kernel; everything else is in pyproject.toml.

``reprod._kernel`` computes the comparison statistics of float32/float64 pairs in one pass.
It is optional: when no C compiler is available the build goes on without it and reprod uses
its numpy path (same results, slower). Build it in place for development with
``python setup.py build_ext --inplace``.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    args = ["/O2", "/fp:precise"]
else:
    # no fused multiply-add: atol + rtol*|ref| must round exactly as numpy.isclose rounds it
    args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi"]

setup(
    ext_modules=[
        Extension(
            "reprod._kernel",
            sources=["reprod/_kernel.c"],
            # headers _kernel.c includes: listed so that the sdist ships them (setuptools>=68
            # adds an extension's in-tree depends to it) and a changed one rebuilds the kernel
            depends=["reprod/_float_text.h", "reprod/_float_text_pow10.h"],
            extra_compile_args=args,
            optional=True,
        )
    ]
)
