"""Native parts of meterhouse (everything else is in pyproject.toml).

Each extension is optional: without a C compiler the package installs and runs on its pure-Python
paths (slower). The test suite requires them, so CI always exercises them.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meterhouse.core._native",
            ["meterhouse/core/_native.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        # The decoder's fast path: OTLP request bytes straight to the number columns (collector/decode.py).
        Extension(
            "meterhouse.collector._otlpfast",
            ["collector/_otlpfast.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
    ]
)
