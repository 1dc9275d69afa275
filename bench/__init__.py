"""The lab: benchmarks, compile reports, the GPU session, design studies and comparisons (README.md)."""
