"""Benchmarks for qlora_kernels (run as scripts: python benchmarks/bench_quantize.py)."""
