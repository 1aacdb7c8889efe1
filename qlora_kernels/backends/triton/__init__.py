"""Triton backend (qlora_kernels/triton/). On the CPU it runs only through Triton's
interpreter (TRITON_INTERPRET=1), which the tests use.
"""
