"""Fixtures for the whole suite."""
from __future__ import annotations

import importlib.util

import pytest

import background


@pytest.fixture(autouse=True)
def fused_kernels_at_every_size(monkeypatch):
    """``fusedgrad.torch`` hands small CPU tensors to PyTorch's own kernels; the tests, whose
    tensors are small, are about fusedgrad's, so that hand-over is switched off here (the
    tests of the hand-over itself set the thresholds back)."""
    if importlib.util.find_spec("torch") is not None:
        from fusedgrad import _torch_ops
        monkeypatch.setattr(_torch_ops, "BATCH_NORM_MIN_ELEMENTS", 0)
        monkeypatch.setattr(_torch_ops, "CROSS_ENTROPY_MIN_SAMPLES", 0)


# --------------------------------------------------------------------------------------------
# Subprocess checks beside the suite (see background.py)
# --------------------------------------------------------------------------------------------
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """After selection (-k, -m): the tests that wait for a background process go last, so the
    in-process tests run while the processes do."""
    items.sort(key=lambda item: bool(background.runs_of(item)))  # stable: order kept otherwise


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    needed = []
    for item in session.items:
        for run in background.runs_of(item):
            if run not in needed:
                needed.append(run)
    background.start_in_background(needed)


def pytest_unconfigure(config):
    background.stop_all()
