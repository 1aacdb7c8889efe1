"""Triton kernels, one op per file (kernels, then launchers). On a machine without a GPU
they run through Triton's interpreter (TRITON_INTERPRET=1), which the tests use."""
