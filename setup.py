"""The native part of the build: the decoder's fast path (collector/_otlpfast.c, CPython C API only).

Everything else is declared in pyproject.toml. The extension is optional for the build (a machine
without a C compiler still installs, and the decoder runs its Python path); the test suite requires it.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meterhouse.collector._otlpfast",
            ["collector/_otlpfast.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
