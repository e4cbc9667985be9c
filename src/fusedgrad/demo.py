"""``python -m fusedgrad demo``: a small network trained with backprop written out by hand.

Trains a multilayer perceptron on scikit-learn's bundled 8x8 handwritten digits (1797 images,
10 classes, no download) with nothing but NumPy and fusedgrad's two fused operations. For a
mini-batch of B rows x [B, 64] with class indices t [B]:

    forward                                   shapes     where
    a = x W1                                  [B, H]     NumPy (no bias: batch norm subtracts
                                                         the batch mean, which would cancel it;
                                                         beta takes its role)
    h, mean, invstd = BN(a; gamma, beta)      [B, H]     fg.batch_norm_forward (derivations, 2)
    r = max(h, 0)                             [B, H]     NumPy
    z = r W2 + b2                             [B, 10]    NumPy
    L = mean_b CE(z_b, t_b), dz = (p - y)/B   [B, 10]    fg.softmax_cross_entropy (derivations, 1)

    backward (the chain rule, layer by layer, from dz)
    dW2 = r^T dz,  db2 = sum_b dz,  dr = dz W2^T         NumPy
    dh  = dr * [h > 0]                                   NumPy (ReLU passes gradient where h > 0)
    da, dgamma, dbeta = BN'(dh; a, mean, invstd, gamma)  fg.batch_norm_backward (derivations, 2)
    dW1 = x^T da                                         NumPy

"(derivations, N)" is section N of ``docs/derivations.md``, where both gradients are derived.

Parameters are updated by SGD with momentum and a cosine learning-rate decay; evaluation uses
batch norm in eval mode (running statistics). Every epoch prints a progress bar with the loss
and accuracies; the last line is ``test accuracy: 0.xxx``. ``--plot PATH`` writes the loss and
accuracy curves as a PNG. Everything is seeded and fusedgrad's kernels are deterministic, so a
run is reproducible.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import fusedgrad as fg
from fusedgrad._cli import check_output_path

N_CLASSES = 10


@dataclass
class History:
    """Per-epoch curves: mean training loss / accuracy over the epoch's batches, test ones, and
    the wall-clock seconds of each epoch (training and evaluation)."""
    train_loss: list = field(default_factory=list)
    train_accuracy: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    seconds: list = field(default_factory=list)


class MLP:
    """Linear(n_in, H) -> BatchNorm(H) -> ReLU -> Linear(H, 10), float32, backprop by hand."""

    def __init__(self, n_in: int, n_hidden: int, rng: np.random.Generator):
        # He initialisation for the layer feeding the ReLU, Glorot-style for the output layer.
        self.params = {
            "W1": (rng.standard_normal((n_in, n_hidden)) * np.sqrt(2.0 / n_in)),
            "gamma": np.ones(n_hidden),
            "beta": np.zeros(n_hidden),
            "W2": (rng.standard_normal((n_hidden, N_CLASSES)) * np.sqrt(1.0 / n_hidden)),
            "b2": np.zeros(N_CLASSES),
        }
        self.params = {k: v.astype(np.float32) for k, v in self.params.items()}
        self.running_mean = np.zeros(n_hidden, np.float32)
        self.running_var = np.ones(n_hidden, np.float32)

    def forward(self, x: np.ndarray, *, training: bool):
        """Logits [B, 10] and what backward needs. Training also updates the running stats."""
        p = self.params
        a = x @ p["W1"]
        h, mean, invstd = fg.batch_norm_forward(
            a, p["gamma"], p["beta"], self.running_mean, self.running_var, training=training)
        r = np.maximum(h, 0.0)
        logits = r @ p["W2"] + p["b2"]
        return logits, (x, a, mean, invstd, h, r)

    def backward(self, dlogits: np.ndarray, cache) -> dict:
        """Gradients of the loss for every parameter, given dL/dlogits (p - y, see
        ``docs/derivations.md``, section 1(b))."""
        x, a, mean, invstd, h, r = cache
        p = self.params
        grads = {"W2": r.T @ dlogits, "b2": dlogits.sum(axis=0)}
        dh = (dlogits @ p["W2"].T) * (h > 0.0)
        da, grads["gamma"], grads["beta"] = fg.batch_norm_backward(
            dh, a, mean, invstd, p["gamma"], training=True)
        grads["W1"] = x.T @ da
        return grads


class SGD:
    """SGD with momentum and L2 weight decay on the weight matrices."""

    def __init__(self, params: dict, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.decay = {k: weight_decay if k.startswith("W") else 0.0 for k in params}
        self.velocity = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict) -> None:
        for k, param in self.params.items():
            v = self.velocity[k]
            v *= self.momentum
            v += grads[k] + self.decay[k] * param
            param -= self.lr * v


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """Digits scaled to [0, 1] as float32 [n, 64], labels int64, stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    t = digits.target.astype(np.int64)
    return train_test_split(x, t, test_size=test_fraction, stratify=t, random_state=seed)


def evaluate(model: MLP, x: np.ndarray, t: np.ndarray):
    """Mean loss and accuracy with batch norm in eval mode (running statistics)."""
    logits, _ = model.forward(x, training=False)
    loss, _ = fg.softmax_cross_entropy_forward(logits, t)
    return float(loss), float(np.mean(logits.argmax(axis=1) == t))


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total
    return "[" + "#" * filled + "." * (width - filled) + f"] {done:>{len(str(total))}}/{total}"


def train(args, out=None) -> tuple[MLP, History]:
    """Train as ``args`` says; prints a progress bar per epoch to ``out`` (default: stdout)."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # The matrix products here are tiny (at most 128 x 128): BLAS threads cannot speed them up,
    # but their spinning workers compete for the cores with the fused kernels' own threads
    # between calls, which made the demo several times slower on 2 cores.
    with threadpool_limits(limits=1, user_api="blas"):
        return _train(args, sys.stdout if out is None else out)


def _train(args, out) -> tuple[MLP, History]:
    rng = np.random.default_rng(args.seed)
    x_train, x_test, t_train, t_test = load_digits_split(args.seed)
    model = MLP(x_train.shape[1], args.hidden, rng)
    optimizer = SGD(model.params, args.lr)
    history = History()
    n_batches = -(-len(x_train) // args.batch_size)
    live = out.isatty()
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        # Cosine decay of the step size from lr to 0 settles the weights by the last epoch.
        optimizer.lr = args.lr * 0.5 * (1.0 + np.cos(np.pi * (epoch - 1) / args.epochs))
        order = rng.permutation(len(x_train))
        losses, correct = [], 0
        label = f"epoch {epoch:>{len(str(args.epochs))}}/{args.epochs} "
        for b in range(n_batches):
            rows = order[b * args.batch_size:(b + 1) * args.batch_size]
            logits, cache = model.forward(x_train[rows], training=True)
            loss, dlogits = fg.softmax_cross_entropy(logits, t_train[rows])
            optimizer.step(model.backward(dlogits, cache))
            losses.append(float(loss) * len(rows))
            correct += int(np.sum(logits.argmax(axis=1) == t_train[rows]))
            if live:
                out.write("\r" + label + progress_bar(b + 1, n_batches))
                out.flush()
        history.train_loss.append(sum(losses) / len(x_train))
        history.train_accuracy.append(correct / len(x_train))
        test_loss, test_accuracy = evaluate(model, x_test, t_test)
        history.test_loss.append(test_loss)
        history.test_accuracy.append(test_accuracy)
        history.seconds.append(time.perf_counter() - start)
        out.write(("\r" if live else "") + label + progress_bar(n_batches, n_batches)
                  + f"  loss {history.train_loss[-1]:.4f}  train acc {correct / len(x_train):.3f}"
                  f"  test loss {test_loss:.4f}  test acc {test_accuracy:.3f}\n")
        out.flush()
    return model, history


def plot_history(history: History, path: str) -> None:
    """Loss and accuracy curves (train and test) side by side, written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history.train_loss) + 1)
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)  # render off-screen without touching pyplot's global state
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, history.train_loss, label="train (batch statistics)")
    ax_loss.plot(epochs, history.test_loss, label="test (running statistics)")
    ax_loss.set(xlabel="epoch", ylabel="softmax cross-entropy", yscale="log", title="loss")
    ax_acc.plot(epochs, history.train_accuracy, label="train")
    ax_acc.plot(epochs, history.test_accuracy, label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MLP with fused batch norm and softmax cross-entropy on sklearn digits")
    fig.savefig(path, dpi=100)


def _positive(kind):
    """An argparse type: ``kind(text)`` that must be > 0, with a readable error otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedgrad demo",
        description="Train Linear-BatchNorm-ReLU-Linear on sklearn's digits with hand-written "
                    "NumPy backprop and fusedgrad's fused batch norm and softmax cross-entropy.")
    parser.add_argument("--epochs", type=_positive(int), default=20, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--hidden", type=_positive(int), default=128,
                        help="hidden units (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive(int), default=128,
                        help="default: %(default)s")
    parser.add_argument("--lr", type=_positive(float), default=0.1,
                        help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--plot", metavar="PATH",
                        help="write the loss and accuracy curves to this PNG file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fusedgrad demo``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_path(parser, "--plot", args.plot)  # now, not after the training
    _, history = train(args)
    print(f"trained {args.epochs} epochs in {sum(history.seconds):.1f} s; the first took "
          f"{history.seconds[0]:.1f} s, as it compiles fusedgrad's kernels (or loads them from "
          "Numba's cache)")
    if args.plot:
        plot_history(history, args.plot)
        print(f"curves written to {args.plot}")
    print(f"test accuracy: {history.test_accuracy[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
