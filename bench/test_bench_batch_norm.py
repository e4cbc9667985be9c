"""Batch norm, float32: training forward + backward (NCHW, many channels, (N, C), NHWC) and
eval forward: fusedgrad vs PyTorch eager (channels_last for NHWC), torch.compile, JAX and NumPy."""
import pytest

from fusedgrad._bench import standard_cases
from fusedgrad._bench_peers import IMPLEMENTATIONS

CASES = standard_cases("cpu", "batch_norm_train", "batch_norm_eval")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_batch_norm(bench_case, case, impl):
    bench_case(case, impl)
