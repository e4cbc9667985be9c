"""CPU backend: ``@njit(parallel=True, cache=True)`` kernels, compiled on first call."""
