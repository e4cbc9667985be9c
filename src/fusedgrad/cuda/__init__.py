"""CUDA backend: ``@cuda.jit`` kernels (NVIDIA's numba-cuda), imported only for device arrays."""
