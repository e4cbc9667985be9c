"""Softmax cross-entropy forward + backward, float32: fusedgrad vs PyTorch eager,
torch.compile, JAX and NumPy."""
import pytest

from fusedgrad._bench import standard_cases
from fusedgrad._bench_peers import IMPLEMENTATIONS

CASES = standard_cases("cpu", "cross_entropy")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_cross_entropy_forward_backward(bench_case, case, impl):
    bench_case(case, impl)
