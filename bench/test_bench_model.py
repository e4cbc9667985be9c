"""Forward + backward step of a small CNN with batch norm and cross-entropy: converted with
fusedgrad.torch.convert_model (impl "fusedgrad") vs PyTorch's own modules (impl "torch")."""
import pytest

from fusedgrad._bench import standard_cases

pytest.importorskip("torch")

CASES = standard_cases("cpu", "model")


@pytest.mark.parametrize("impl", ["fusedgrad", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_model_step(bench_case, case, impl):
    bench_case(case, impl)
