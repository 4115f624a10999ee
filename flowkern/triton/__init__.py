"""Triton kernels (the GPU default). Importing this package imports triton;
flowkern imports it lazily, only when the triton backend is chosen."""
