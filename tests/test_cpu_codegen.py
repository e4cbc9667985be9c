"""The per-function vector-width hints of ``fusedgrad.cpu._codegen``: each reaches the LLVM IR of
the function that calls it (a prange body, compiled as a function of its own, or a plain
``@njit`` function), and only that function, and it changes no result."""
import numpy as np
import pytest
from numba import njit, prange

from fusedgrad.cpu._codegen import (_PREFER_256_BIT, _PREFER_512_BIT, prefer_narrow_vectors,
                                    prefer_wide_vectors)


@njit(parallel=True)
def _scaled_with_hint(x, out):
    for chunk in prange(2):
        prefer_wide_vectors()
        half = x.shape[0] // 2
        for i in range(chunk * half, (chunk + 1) * half):
            out[i] = np.float32(1.5) * x[i]


@njit(parallel=True)
def _scaled_without_hint(x, out):
    for chunk in prange(2):
        half = x.shape[0] // 2
        for i in range(chunk * half, (chunk + 1) * half):
            out[i] = np.float32(1.5) * x[i]


def _llvm_text(dispatcher) -> str:
    text = dispatcher.inspect_llvm(dispatcher.signatures[0])
    return "".join(text.values()) if isinstance(text, dict) else text


@njit
def _affine_with_narrow_hint(x, out):
    prefer_narrow_vectors()
    for i in range(x.shape[0]):
        out[i] = np.float32(1.5) * x[i] + np.float32(0.25)


@njit
def _affine_without_hint(x, out):
    for i in range(x.shape[0]):
        out[i] = np.float32(1.5) * x[i] + np.float32(0.25)


@pytest.mark.parametrize("hinted, unhinted, attribute", [
    (_scaled_with_hint, _scaled_without_hint, _PREFER_512_BIT),  # in a prange body
    (_affine_with_narrow_hint, _affine_without_hint, _PREFER_256_BIT),  # in a plain function
], ids=["wide", "narrow"])
def test_hint_marks_its_function_and_changes_no_value(hinted, unhinted, attribute):
    x = np.arange(4096, dtype=np.float32)
    with_hint, without_hint = np.empty_like(x), np.empty_like(x)
    hinted(x, with_hint)
    unhinted(x, without_hint)
    np.testing.assert_array_equal(with_hint, without_hint)
    assert attribute in _llvm_text(hinted)
    assert attribute not in _llvm_text(unhinted)
