"""The backprop demo: trains to the accuracy bar, prints its progress, writes its plot."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fusedgrad import demo  # noqa: E402
from fusedgrad import reference  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_default_run_reaches_the_accuracy_bar_and_writes_the_plot(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert demo.main(["--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 20 and epochs[-1].startswith("epoch 20/20 [" + "#" * 30 + "]")
    match = re.fullmatch(r"test accuracy: (0\.\d{3}|1\.000)", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) >= 0.95
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 10_000


def test_run_is_reproducible(capsys):
    outputs = []
    for _ in range(2):
        assert demo.main(["--epochs", "2", "--seed", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    # The timing line differs between runs; every other line, the final one included, must not.
    stable = [[line for line in out.splitlines() if not line.startswith("trained")]
              for out in outputs]
    assert stable[0] == stable[1]
    assert len(stable[0]) == 3 and stable[0][-1].startswith("test accuracy: ")


def test_runs_from_the_command_line():
    command = [sys.executable, "-m", "fusedgrad", "demo", "--epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1].startswith("test accuracy: ")


def test_hand_written_backward_matches_finite_differences():
    """The NumPy backprop through Linear, fused BN, ReLU, Linear and fused CE is the gradient.

    Checked along random directions, two per parameter array (a wrong gradient fails a random
    direction with probability 1), which needs few loss evaluations.
    """
    rng = np.random.default_rng(0)
    x = rng.random((12, 6))
    t = rng.integers(0, demo.N_CLASSES, 12)
    model = demo.MLP(6, 5, rng)
    model.params = {k: v.astype(np.float64) for k, v in model.params.items()}
    model.running_mean, model.running_var = np.zeros(5), np.ones(5)

    def loss_of_params():
        logits, _ = model.forward(x, training=True)
        return reference.softmax_cross_entropy(logits, t)[0]

    logits, cache = model.forward(x, training=True)
    _, dlogits = demo.fg.softmax_cross_entropy(logits, t)
    grads = model.backward(dlogits, cache)
    step = 1e-6
    for name, param in model.params.items():
        for _ in range(2):
            direction = rng.standard_normal(param.shape)
            saved = param.copy()
            param += step * direction
            up = loss_of_params()
            param[...] = saved - step * direction
            down = loss_of_params()
            param[...] = saved
            numeric = (up - down) / (2 * step)
            np.testing.assert_allclose(np.sum(grads[name] * direction), numeric,
                                       rtol=1e-6, atol=1e-9, err_msg=name)


def test_bad_arguments_exit_with_status_2(capsys, tmp_path):
    # --plot is checked before training, as the bench's --json and --plot are.
    for argv in (["--epochs", "0"], ["--epochs", "two"], ["--lr", "-1"],
                 ["--plot", "/no/such/folder/curves.png"], ["--plot", str(tmp_path)],
                 ["--bogus"]):
        with pytest.raises(SystemExit) as exc:
            demo.main(argv)
        assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err
