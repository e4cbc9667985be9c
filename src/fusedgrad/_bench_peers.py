"""What a benchmark case times: fusedgrad and every implementation a user would pick instead.

Each case builds its inputs once (seeded) and hands the same data to every implementation:

- ``fusedgrad``: the public API (``fg.softmax_cross_entropy``, ``fg.batch_norm_forward`` +
  ``fg.batch_norm_backward``), host arrays on the CPU, device arrays on the GPU;
- ``torch``: PyTorch eager, ``F.cross_entropy(...).backward()`` / ``nn.BatchNorm*d`` forward +
  ``.backward()``, with as many threads as Numba uses (when PyTorch is installed);
- ``torch_compile``: the same PyTorch code through ``torch.compile`` (Inductor generates fused
  C++/OpenMP kernels on the CPU, Triton kernels on the GPU); compiled in the warm-up call;
- ``jax``: ``jax.jit`` of the same math as a JAX user writes it (CPU only, when JAX is
  installed; not a dependency of fusedgrad): cross-entropy as ``logsumexp - z[target]`` through
  ``jax.value_and_grad``, batch norm as Flax's ``BatchNorm`` computes it (mean and mean of
  squares in one pass) through ``jax.vjp``;
- ``torch_chunked`` (linear + cross-entropy only): ``F.linear_cross_entropy`` with
  ``options=LinearCrossEntropyOptions()``, PyTorch's own chunked path (PyTorch 2.13 and later);
- ``liger`` (GPU, cross-entropy and linear + cross-entropy): Liger-Kernel's Triton kernels,
  ``LigerCrossEntropyLoss`` and ``LigerFusedLinearCrossEntropyLoss``, when ``liger-kernel`` is
  installed (not a dependency of fusedgrad). Its cross-entropy writes the gradient over the
  logits in its forward, so it gets a copy of them, which after the first call holds
  gradients: the same work per call, on other values;
- ``reference``: the float64 NumPy oracle ``fusedgrad.reference`` (CPU only), on the leading rows
  when the full input is above ``REFERENCE_ELEMENT_BUDGET`` elements, its time scaled linearly.

``PEERS`` are the implementations fusedgrad competes with; the reference is a baseline for the
reader (what plain NumPy costs), not a peer.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from typing import Callable

import numba
import numpy as np

import fusedgrad
from fusedgrad import reference

IMPLEMENTATIONS = ("fusedgrad", "torch", "torch_compile", "torch_chunked", "jax", "liger",
                   "reference")
PEERS = ("torch", "torch_compile", "torch_chunked", "jax", "liger")
LABELS = {"fusedgrad": "fusedgrad", "torch": "PyTorch eager", "torch_compile": "torch.compile",
          "torch_chunked": "PyTorch chunked", "jax": "JAX jit", "liger": "Liger-Kernel",
          "reference": "NumPy float64"}
#: the operations Liger-Kernel has a kernel for
LIGER_OPS = ("cross_entropy", "linear_cross_entropy")
#: above this many input elements the float64 NumPy reference runs on the leading rows only.
REFERENCE_ELEMENT_BUDGET = 1 << 22
#: batch norm's epsilon in every implementation (PyTorch's default).
EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Optional dependencies and the device
# --------------------------------------------------------------------------------------------
def import_torch():
    """``torch``, or None when it is not installed (the PyTorch peers are then skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def import_jax():
    """``jax``, or None when it is not installed (the JAX peer is then skipped)."""
    try:
        import jax
    except ImportError:
        return None
    return jax


def import_liger():
    """``liger_kernel.transformers``, or None when Liger-Kernel is not installed or does not load
    (it needs Triton and a GPU)."""
    try:
        import liger_kernel.transformers as liger
    except Exception:  # ImportError, or Triton failing to set up without a GPU
        return None
    return liger


def has_chunked_linear_cross_entropy(torch) -> bool:
    """Whether PyTorch has ``F.linear_cross_entropy`` with its chunked option (2.13 and later)."""
    return hasattr(torch.nn, "LinearCrossEntropyOptions")


def match_torch_threads(torch) -> None:
    """Give PyTorch as many intra-op threads as Numba uses, so the comparison is like for like."""
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())


def torch_compile_unavailable(torch, device_name: str) -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can."""
    if torch is None:
        return "PyTorch is not installed"
    if device_name == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "Inductor needs a C++ compiler on the CPU (none on PATH)"
    return None


class Device:
    """Puts a case's inputs where it runs and synchronises around each timed call.

    ``torch_device`` is where the PyTorch peers run ("cpu" or "cuda"), or None when PyTorch is
    missing or, on the GPU, has no CUDA; ``jax`` is the module on the CPU when installed;
    ``liger`` Liger-Kernel's modules on the GPU when installed.
    """

    def __init__(self, name: str):
        self.name = name
        self.torch = import_torch()
        self.jax = import_jax() if name == "cpu" else None
        self.liger = None
        self._cuda = None
        if name == "cuda":
            from numba import cuda
            self._cuda = cuda
        usable = self.torch is not None and (name == "cpu" or self.torch.cuda.is_available())
        self.torch_device = name if usable else None
        if name == "cuda" and usable:
            self.liger = import_liger()

    def inputs(self, host: np.ndarray, dtype: str | None = None) -> tuple:
        """``host`` as ``dtype`` on this device: (array for fusedgrad, tensor for torch or None).

        Both share one buffer, so the implementations read identical data: on the CPU a NumPy
        array and a zero-copy tensor of it; on the GPU one CUDA tensor, which fusedgrad takes
        through ``__cuda_array_interface__`` (the only way to give it bfloat16, which NumPy
        lacks), or a Numba device array when PyTorch has no CUDA.
        """
        dtype = dtype or host.dtype.name
        if self.name == "cuda" and self.torch_device is not None:
            tensor = self.torch.from_numpy(host).to("cuda").to(getattr(self.torch, dtype))
            return tensor, tensor
        if dtype == "bfloat16":
            raise TypeError("bfloat16 inputs need PyTorch with CUDA (NumPy has no bfloat16)")
        array = host.astype(dtype, copy=False)
        if self._cuda is not None:
            return self._cuda.to_device(array), None
        return array, (None if self.torch is None else self.torch.from_numpy(array))

    def synchronize(self) -> None:
        # numba's synchronize waits for the whole (primary) context, PyTorch's streams included.
        if self._cuda is not None:
            self._cuda.synchronize()

    def missing_peers(self, op: str) -> dict:
        """Peer -> why it is not timed on this device, for a case of operation ``op``."""
        missing = {}
        if self.torch_device is None:
            why = ("PyTorch not installed" if self.torch is None
                   else "this PyTorch build has no CUDA")
            missing["torch"] = missing["torch_compile"] = missing["torch_chunked"] = why
        else:
            why = torch_compile_unavailable(self.torch, self.name)
            if why:
                missing["torch_compile"] = why
        if op != "linear_cross_entropy":
            missing["torch_chunked"] = "PyTorch's chunked path exists for linear + CE only"
        elif self.torch is not None and not has_chunked_linear_cross_entropy(self.torch):
            missing["torch_chunked"] = (f"PyTorch {self.torch.__version__} has no "
                                        "F.linear_cross_entropy (2.13 and later)")
        if self.name != "cpu" and op in LIGER_OPS and self.liger is None:
            missing["liger"] = (missing["torch"] if self.torch_device is None
                                else "Liger-Kernel not installed (pip install liger-kernel)")
        if op == "model":
            # The model case compares a converted model with PyTorch's own: nothing to compile
            # or translate for the other peers.
            missing.setdefault("torch_compile", "the model case compares with PyTorch eager only")
            missing["jax"] = "the model case compares with PyTorch eager only"
        elif self.name != "cpu":
            missing["jax"] = "JAX is timed on the CPU only"
        elif self.jax is None:
            missing["jax"] = "JAX not installed (pip install jax)"
        return missing


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runner:
    """One implementation of a case: ``fn`` runs it once; its time is multiplied by ``scale``
    (the reference on a row subset) and ``note`` says why when ``scale != 1``."""

    impl: str
    fn: Callable[[], object]
    scale: float = 1.0
    note: str = ""
    #: Model cases: measures the share of this model's step spent in batch norm + the loss
    #: (see :func:`fused_op_share`), given the number of steps to time.
    fused_op_share: Callable[[int], float] | None = None


def _reference_rows(shape: tuple) -> int:
    """How many leading rows (samples) the NumPy reference runs on, within the element budget."""
    per_row = math.prod(shape[1:])
    return max(2, min(shape[0], REFERENCE_ELEMENT_BUDGET // per_row))


def reference_runner(shape: tuple, run_rows: Callable[[int], object]) -> Runner:
    rows = _reference_rows(shape)
    if rows == shape[0]:
        return Runner("reference", lambda: run_rows(rows))
    return Runner("reference", lambda: run_rows(rows), scale=shape[0] / rows,
                  note=f"NumPy reference timed on {rows} of {shape[0]} rows, "
                       "scaled linearly to the full size")


def _torch_variants(device: Device, make: Callable[[], Callable]) -> list:
    """[(impl, callable)] for PyTorch eager and, where it can run, ``torch.compile`` of a fresh
    ``make()`` (modules are not shared, so their running buffers stay separate)."""
    variants = [("torch", make())]
    if torch_compile_unavailable(device.torch, device.name) is None:
        # Dynamo keeps compiled graphs per code object (F.cross_entropy's, BatchNorm.forward's)
        # and falls back to eager after 8 recompilations of one: start each case afresh.
        device.torch._dynamo.reset()
        variants.append(("torch_compile", device.torch.compile(make(), dynamic=False)))
    return variants


def _cross_entropy_runners(case, shape: tuple, device: Device, rng) -> list:
    n, classes = shape
    logits, logits_t = device.inputs(rng.standard_normal(shape, dtype=np.float32), case.dtype)
    target, target_t = device.inputs(rng.integers(0, classes, size=n, dtype=np.int64))
    runners = [Runner("fusedgrad", lambda: fusedgrad.softmax_cross_entropy(logits, target))]
    if device.torch_device is not None:
        cross_entropy = device.torch.nn.functional.cross_entropy
        for impl, loss_fn in _torch_variants(device, lambda: cross_entropy):
            leaf = logits_t.detach().requires_grad_()

            def torch_step(leaf=leaf, loss_fn=loss_fn):
                leaf.grad = None
                loss_fn(leaf, target_t).backward()

            runners.append(Runner(impl, torch_step))
    if device.liger is not None:
        liger_loss = device.liger.LigerCrossEntropyLoss()
        liger_leaf = logits_t.detach().clone().requires_grad_()

        def liger_step():
            liger_leaf.grad = None
            liger_loss(liger_leaf, target_t).backward()

        runners.append(Runner("liger", liger_step))
    if device.jax is not None:
        runners.append(_jax_cross_entropy(device.jax, logits, target))
    if device.name == "cpu":
        runners.append(reference_runner(
            shape, lambda rows: reference.softmax_cross_entropy(logits[:rows], target[:rows])))
    return runners


def _jax_cross_entropy(jax, logits: np.ndarray, target: np.ndarray) -> Runner:
    """Mean cross-entropy and its gradient, as ``optax.softmax_cross_entropy_with_integer_labels``
    computes it, under one ``jax.jit``."""
    jnp = jax.numpy

    def loss(z, t):
        picked = jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - picked)

    step = jax.jit(jax.value_and_grad(loss))
    z, t = jax.device_put(logits), jax.device_put(target.astype(np.int32))
    return Runner("jax", lambda: jax.block_until_ready(step(z, t)))


def _torch_batch_norm(torch, case, channels: int, weight, bias, ndim: int, on: str):
    """A torch ``BatchNorm1d``/``2d`` with the case's affine parameters, on device ``on``."""
    cls = torch.nn.BatchNorm1d if ndim in (2, 3) else torch.nn.BatchNorm2d
    module = cls(channels, eps=EPS).to(on, getattr(torch, case.dtype))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
    return module.train(case.op == "batch_norm_train")


def _as_torch_layout(tensor, case):
    """NHWC storage seen as a logical NCHW tensor in PyTorch's ``channels_last`` format."""
    return tensor.permute(0, 3, 1, 2) if case.layout == "NHWC" else tensor


def _batch_norm_runners(case, shape: tuple, device: Device, rng) -> list:
    axis = case.channel_axis
    channels = shape[axis]
    x, x_t = device.inputs(rng.standard_normal(shape, dtype=np.float32), case.dtype)
    dy, dy_t = device.inputs(rng.standard_normal(shape, dtype=np.float32), case.dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    w_d, b_d, rm_d, rv_d = (device.inputs(a, case.dtype)[0] for a in (
        weight, bias, np.zeros(channels, np.float32), np.ones(channels, np.float32)))
    training = case.op == "batch_norm_train"

    if training:
        def fused():
            _, mean, invstd = fusedgrad.batch_norm_forward(
                x, w_d, b_d, rm_d, rv_d, training=True, channel_axis=axis)
            return fusedgrad.batch_norm_backward(dy, x, mean, invstd, w_d, training=True,
                                                 channel_axis=axis)
    else:
        def fused():
            return fusedgrad.batch_norm_forward(x, w_d, b_d, rm_d, rv_d, training=False,
                                                channel_axis=axis)
    runners = [Runner("fusedgrad", fused)]

    if device.torch_device is not None:
        torch = device.torch
        x_leaf = _as_torch_layout(x_t, case).detach().requires_grad_(training)
        dy_view = _as_torch_layout(dy_t, case)

        def make_module():
            return _torch_batch_norm(torch, case, channels, weight, bias, len(shape),
                                     device.torch_device)

        for impl, module in _torch_variants(device, make_module):
            if training:
                def torch_step(module=module):
                    x_leaf.grad = None
                    module.zero_grad(set_to_none=True)
                    module(x_leaf).backward(dy_view)
            else:
                def torch_step(module=module):
                    with torch.no_grad():
                        return module(x_leaf)
            runners.append(Runner(impl, torch_step))

    if device.jax is not None:
        runners.append(_jax_batch_norm(device.jax, x, dy, weight, bias, axis, training))

    if device.name == "cpu":
        def run_reference(rows):
            ref_rm, ref_rv = np.zeros(channels), np.ones(channels)
            y, mean, invstd, _ = reference.batch_norm_forward(
                x[:rows], weight, bias, ref_rm, ref_rv, training=training, channel_axis=axis)
            if training:
                reference.batch_norm_backward(dy[:rows], x[:rows], mean, invstd, weight,
                                              training=True, channel_axis=axis)
            return y
        runners.append(reference_runner(shape, run_reference))
    return runners


def _jax_batch_norm(jax, x, dy, weight, bias, axis: int, training: bool,
                    momentum: float = 0.1) -> Runner:
    """Batch norm as ``flax.linen.BatchNorm`` computes it (batch mean and mean of squares in
    one pass, ``var = E[x^2] - E[x]^2``, running averages updated), forward + ``jax.vjp``
    backward with ``dy``, under one ``jax.jit``; eval: the running statistics only."""
    jnp = jax.numpy
    axis = axis % x.ndim
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    gamma, beta = jnp.asarray(weight).reshape(shape), jnp.asarray(bias).reshape(shape)
    running_mean = jnp.zeros(x.shape[axis], jnp.float32)
    running_var = jnp.ones(x.shape[axis], jnp.float32)
    x_d, dy_d = jax.device_put(x), jax.device_put(dy)

    def normalise(x, gamma, beta):
        mean = jnp.mean(x, axis=reduce_axes, keepdims=True)
        var = jnp.mean(x * x, axis=reduce_axes, keepdims=True) - mean * mean
        y = (x - mean) * jax.lax.rsqrt(var + EPS) * gamma + beta
        return y, (mean.reshape(-1), var.reshape(-1))

    @jax.jit
    def train_step(x, dy, gamma, beta, running_mean, running_var):
        y, vjp, (mean, var) = jax.vjp(normalise, x, gamma, beta, has_aux=True)
        dx, dgamma, dbeta = vjp(dy)
        count = x.size // x.shape[axis]
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
        return y, dx, dgamma, dbeta, new_mean, new_var

    @jax.jit
    def eval_step(x, gamma, beta, running_mean, running_var):
        invstd = jax.lax.rsqrt(running_var + EPS).reshape(shape)
        return (x - running_mean.reshape(shape)) * invstd * gamma + beta

    if training:
        return Runner("jax", lambda: jax.block_until_ready(
            train_step(x_d, dy_d, gamma, beta, running_mean, running_var)))
    return Runner("jax", lambda: jax.block_until_ready(
        eval_step(x_d, gamma, beta, running_mean, running_var)))


def _linear_cross_entropy_runners(case, shape: tuple, device: Device, rng) -> list:
    """Loss, grad_input and grad_linear_weight of ``cross_entropy(x @ W.T, t)``: fusedgrad
    through ``fusedgrad.torch.linear_cross_entropy`` (its NumPy API without PyTorch) against
    the unfused composite (eager and compiled), PyTorch's chunked path and JAX."""
    n, d, classes = shape
    x = (0.5 * rng.standard_normal((n, d), dtype=np.float32)).astype(case.dtype)
    w = (0.02 * rng.standard_normal((classes, d), dtype=np.float32)).astype(case.dtype)
    target = rng.integers(0, classes, size=n, dtype=np.int64)
    torch = device.torch
    if device.torch_device is None:
        return [Runner("fusedgrad", lambda: fusedgrad.linear_cross_entropy(x, w, target))]
    import fusedgrad.torch as fgt
    on = device.torch_device
    x_leaf = torch.from_numpy(x).to(on).requires_grad_()
    w_leaf = torch.from_numpy(w).to(on).requires_grad_()
    t = torch.from_numpy(target).to(on)
    functional = torch.nn.functional

    def step(loss_fn):
        def run():
            x_leaf.grad = w_leaf.grad = None
            loss_fn(x_leaf, w_leaf, t).backward()
        return run

    def composite(a, b, c):
        return functional.cross_entropy(a @ b.T, c)

    runners = [Runner("fusedgrad", step(fgt.linear_cross_entropy))]
    for impl, fn in _torch_variants(device, lambda: composite):
        runners.append(Runner(impl, step(fn)))
    if has_chunked_linear_cross_entropy(torch):
        options = torch.nn.LinearCrossEntropyOptions()
        runners.append(Runner("torch_chunked", step(
            lambda a, b, c: functional.linear_cross_entropy(a, b, c, options=options))))
    if device.liger is not None:
        liger_loss = device.liger.LigerFusedLinearCrossEntropyLoss()
        runners.append(Runner("liger", step(lambda a, b, c: liger_loss(b, a, c))))
    if device.jax is not None:
        jax = device.jax
        jnp = jax.numpy

        def loss(a, b, c):
            z = a @ b.T
            picked = jnp.take_along_axis(z, c[:, None], axis=1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(z, axis=1) - picked)

        grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        args = (jax.device_put(x), jax.device_put(w), jax.device_put(target.astype(np.int32)))
        runners.append(Runner("jax", lambda: jax.block_until_ready(grads(*args))))
    return runners


# --------------------------------------------------------------------------------------------
# The model-level case
# --------------------------------------------------------------------------------------------
def small_cnn(torch, in_channels: int = 3, classes: int = 10):
    """conv-BN-ReLU x 3 (32, 64, 128 channels, the last two with stride 2), average pool, linear.

    A CIFAR-style network whose batch-norm layers see NCHW activations of the usual sizes.
    """
    nn = torch.nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(in_channels, 32, 1), *block(32, 64, 2), *block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def _training_step(model, loss_fn, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return step


def model_pair(torch, shape: tuple, on: str, rng, fuse_relu: bool = False):
    """(baseline model + loss, converted model + loss, input, target), same initial weights."""
    import fusedgrad.torch as fgt
    torch.manual_seed(0)
    baseline = small_cnn(torch, in_channels=shape[1]).to(on)
    converted = fgt.convert_model(copy.deepcopy(baseline), fuse_relu=fuse_relu)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(on)
    y = torch.from_numpy(rng.integers(0, 10, size=shape[0], dtype=np.int64)).to(on)
    return ((baseline, torch.nn.CrossEntropyLoss()), (converted, fgt.CrossEntropyLoss()), x, y)


def _model_runners(case, shape: tuple, device: Device, rng) -> list:
    if device.torch_device is None:
        raise RuntimeError("the model-level case needs PyTorch"
                           + (" with CUDA" if device.name == "cuda" else ""))
    (baseline, base_loss), (converted, fused_loss), x, y = model_pair(
        device.torch, shape, device.torch_device, rng, case.fuse_relu)

    def runner(impl, model, loss_fn):
        def share(steps):
            return fused_op_share(model, loss_fn, x, y, device, steps)
        return Runner(impl, _training_step(model, loss_fn, x, y), fused_op_share=share)
    return [runner("fusedgrad", converted, fused_loss), runner("torch", baseline, base_loss)]


class _ModuleTimer:
    """Accumulates the wall time spent inside some modules' forward and backward.

    Forward: between a forward pre-hook and a forward hook. Backward: between a full backward
    pre-hook (the gradient of the module's output is ready) and a full backward hook (the
    gradients of its inputs are computed). In a sequential model the autograd engine runs only
    that module's nodes in between, so the interval is the module's own backward time.
    """

    def __init__(self, modules, synchronize):
        self.seconds = 0.0
        self._synchronize = synchronize
        self._started = {}
        self._handles = []
        for module in modules:
            self._handles += [module.register_forward_pre_hook(self._start),
                              module.register_forward_hook(self._stop),
                              module.register_full_backward_pre_hook(self._start),
                              module.register_full_backward_hook(self._stop)]

    def _start(self, module, *_):
        self._synchronize()
        self._started[id(module)] = time.perf_counter()

    def _stop(self, module, *_):
        self._synchronize()
        self.seconds += time.perf_counter() - self._started.pop(id(module))

    def remove(self):
        for handle in self._handles:
            handle.remove()


def fused_op_share(model, loss_fn, x, y, device: Device, steps: int) -> float:
    """Fraction of a forward + backward step spent in batch norm and the loss.

    Measured in separate, instrumented steps (hooks add a little overhead, so the step times
    reported elsewhere come from uninstrumented runs): the time inside the batch-norm modules
    and the loss module (see :class:`_ModuleTimer`) over the whole step's time, both summed
    over the same steps.
    """
    # fusedgrad.torch's batch-norm modules subclass PyTorch's, so this finds both kinds.
    norms = [m for m in model.modules()
             if isinstance(m, device.torch.nn.modules.batchnorm._BatchNorm)]
    timer = _ModuleTimer(norms + [loss_fn], device.synchronize)
    step = _training_step(model, loss_fn, x, y)
    try:
        step()
        timer.seconds = 0.0
        total = 0.0
        for _ in range(steps):
            device.synchronize()
            start = time.perf_counter()
            step()
            device.synchronize()
            total += time.perf_counter() - start
    finally:
        timer.remove()
    return timer.seconds / total


_RUNNER_BUILDERS = {"cross_entropy": _cross_entropy_runners,
                    "linear_cross_entropy": _linear_cross_entropy_runners,
                    "batch_norm_train": _batch_norm_runners,
                    "batch_norm_eval": _batch_norm_runners,
                    "model": _model_runners}


def build_runners(case, device: Device, quick: bool, seed: int = 0) -> list:
    """The runners of ``case`` at its full or quick size, on identical seeded inputs."""
    rng = np.random.default_rng(seed)
    return _RUNNER_BUILDERS[case.op](case, case.shape(quick), device, rng)
