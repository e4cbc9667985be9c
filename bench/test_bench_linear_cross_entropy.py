"""Linear + cross-entropy forward + backward, float32 (N=2048, d=1024, C=32000):
fusedgrad.torch.linear_cross_entropy vs the unfused F.cross_entropy(x @ W.T, t) (eager,
torch.compile, JAX) and PyTorch's chunked F.linear_cross_entropy."""
import pytest

from fusedgrad._bench import standard_cases
from fusedgrad._bench_peers import IMPLEMENTATIONS

CASES = standard_cases("cpu", "linear_cross_entropy")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_linear_cross_entropy_forward_backward(bench_case, case, impl):
    bench_case(case, impl)
