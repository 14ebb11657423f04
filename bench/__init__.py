"""meterhouse benchmarks: `python -m bench [--quick]` (see BENCHMARKS.md)."""
