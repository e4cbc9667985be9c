"""Fixtures for the whole suite."""
from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(autouse=True)
def fused_kernels_at_every_size(monkeypatch):
    """``fusedgrad.torch`` hands small CPU tensors to PyTorch's own kernels; the tests, whose
    tensors are small, are about fusedgrad's, so that hand-over is switched off here (the
    tests of the hand-over itself set the thresholds back)."""
    if importlib.util.find_spec("torch") is not None:
        from fusedgrad import _torch_ops
        monkeypatch.setattr(_torch_ops, "BATCH_NORM_MIN_ELEMENTS", 0)
        monkeypatch.setattr(_torch_ops, "CROSS_ENTROPY_MIN_SAMPLES", 0)
