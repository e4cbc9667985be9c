"""Compile every CUDA kernel of fusedgrad, for every dtype signature, to PTX (no GPU needed).

The simulator runs kernels as Python, so typing errors (a float64 constant leaking into a
float32 kernel, an unsupported operation on float16) only show up when Numba really compiles
them. CI has no GPU, so :func:`compile_all` compiles each kernel with ``numba.cuda.compile_ptx``
for compute capability 9.0 (H100/H200) and the signatures the launchers produce:

* logits / x dtypes float16, bfloat16, float32, float64 (accumulation float32, float32,
  float32, float64);
* class-index targets int64 (``index_target`` converts int32 on the device: that conversion
  kernel is compiled from int32 and int64);
* cross-entropy with and without logit soft-capping: one ``_ce_rows`` per dtype (``softcap``
  is a float64, 0 for no cap, the only way numba-cuda can launch it), and the dense-row kernels
  for the 16- and 32-bit dtypes;
* per-channel parameters (``weight``, ``bias``, running buffers, statistics) of every floating
  dtype, with float32 and float64 accumulation;
* array layouts ``A`` (any strides), the most general typing of the strided views, and for
  the hot kernels (``_apply``, ``_partials``, ``_ce_rows``; the dense-row cross-entropy and
  the spatial and column batch-norm kernels only) also ``C``, the typing of contiguous
  arrays (most launches: labels ending ``,C``);
* the batch norm's fused ReLU: a runtime flag ``relu`` and its output array ``relu_y3`` (a
  stand-in without it), so every batch-norm signature covers it.

bfloat16: numba-cuda types bfloat16 arrays (NumPy has no such dtype; ``_arrays.BFloat16Array``
gives device arrays of PyTorch's ``"<V2"`` bfloat16 that type), so every floating kernel is also
compiled for bfloat16 here. That is the only check of bfloat16 without a GPU: the simulator has
no bfloat16, so those launches run only on a real GPU (``bench/gpu_check.sh``).

numba-cuda compiles device functions called by a kernel for the *current device*'s compute
capability, which needs a driver. Without a GPU, :func:`compile_all` supplies the target
compute capability through a stand-in for ``numba.cuda.dispatcher.get_current_device`` for the
duration of the compilation; run it in a process of its own (``python -m
fusedgrad.cuda._compile``, as the test does) so no device function compiled this way is reused
by real launches. It must run WITHOUT the simulator (``NUMBA_ENABLE_CUDASIM`` unset or 0).

Run ``python -m fusedgrad.cuda._compile [--cc 9.0] [--ptx-dir DIR]``: prints one line per
signature and exits non-zero if any failed; ``--ptx-dir`` also writes each signature's PTX
(for ``ptxas`` / ``nvdisasm``: docs/gpu.md, "SASS census"). PTX of float16/float32 kernels is
checked for float64 arithmetic (``add.f64``, ``fma.rn.f64``, ``setp.*.f64``...): the
batch-norm elementwise kernels must have none, the cross-entropy kernels (``_ce_rows``,
the dense-row kernels) one, the per-sample split of a saved lse (converting to and storing
float64 outputs is allowed).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from types import SimpleNamespace
from unittest import mock

from numba import cuda, types
from numba.cuda import types as cuda_types

#: PTX float64 arithmetic (conversions and loads/stores of float64 outputs are fine).
_FLOAT64_ARITHMETIC = re.compile(r"^\s*(add|sub|mul|fma|div|rcp|sqrt|setp|min|max|neg|abs|ex2|lg2)"
                                 r"[.\w]*\.f64\b", re.MULTILINE)

FLOATS = {"float16": types.float16, "bfloat16": cuda_types.bfloat16, "float32": types.float32,
          "float64": types.float64}
PARAMS = {"float16": types.float16, "bfloat16": cuda_types.bfloat16, "float32": types.float32,
          "float64": types.float64}


def _acc(name: str):
    return types.float64 if name == "float64" else types.float32


def _vec(dtype):
    return types.Array(dtype, 1, "A")


def _mat(dtype):
    return types.Array(dtype, 2, "A")


def _arr3(dtype, layout="A"):
    return types.Array(dtype, 3, layout)


def kernel_signatures():
    """``(label, kernel, argument types, float64_budget)`` for every launch form (``kernel``:
    the ``@cuda.jit`` dispatcher, compiled with its own ``fastmath`` and ``launch_bounds``).

    ``float64_budget``: None where float64 arithmetic is expected; else the most float64
    arithmetic instructions the PTX may hold (0 for the float32-accumulating elementwise
    kernels; 1 for the cross-entropy kernels, which split a saved float64 lse once per sample,
    see ``cross_entropy._split_lse``)."""
    from . import _arrays, _reduce, batch_norm as bn, cross_entropy as ce

    f64, i64, b1 = types.float64, types.int64, types.boolean
    sigs = []
    for name, t in FLOATS.items():
        acc = _acc(name)
        # float64 budgets: none in float32-accumulating elementwise kernels, one (the saved
        # lse's split) in the cross-entropy kernels; unchecked for float64 data
        no_float64 = 0 if name != "float64" else None
        lse_split_only = 1 if name != "float64" else None
        sigs.append((f"cross_entropy._ce_rows[{name}]", ce._ce_rows,
                     (i64, _arr3(t), _vec(i64), _arr3(t), b1, _vec(f64), i64, f64, f64, f64,
                      _vec(acc), _vec(f64), _vec(f64), _arr3(t), _vec(f64)), lse_split_only))
        sigs.append((f"cross_entropy._scaled_copy[{name}]", ce._scaled_copy,
                     (_vec(t), _vec(f64), _vec(f64), b1), None))
        sigs.append((f"_arrays.convert[{name}->float64]", _arrays.convert,
                     (_vec(t), _vec(f64)), None))
        if name != "float64":
            sigs.append((f"_arrays.convert[float64->{name}]", _arrays.convert,
                         (_vec(f64), _vec(t)), None))
        # The fused ReLU is a runtime flag (the same compiled kernel with and without it).
        sigs.append((f"batch_norm._apply[{name}]", bn._apply,
                     (_arr3(t), _arr3(t), _arr3(t), b1, b1, _mat(acc), _arr3(t)), no_float64))
        stat = "float64" if name == "float64" else "float32"
        sigs.append((f"batch_norm._partials[{name},{stat}]", bn._partials,
                     (_arr3(t), _arr3(t), _arr3(t), b1, b1, _mat(acc), _vec(PARAMS[stat]),
                      _vec(PARAMS[stat]), i64, i64, _mat(f64), _mat(f64), _mat(f64)), None))
        # Contiguous arrays (the usual launch) are typed with layout "C", which addresses
        # through GEPs and gives global loads (LDG) where "A" gives generic ones (LD).
        c3, c2, c1 = _arr3(t, "C"), types.Array(acc, 2, "C"), types.Array(f64, 1, "C")
        m64 = types.Array(f64, 2, "C")
        sigs.append((f"batch_norm._apply[{name},C]", bn._apply,
                     (c3, c3, c3, b1, b1, c2, c3), no_float64))
        for width in bn.SPATIAL_WIDTHS:
            sigs.append((f"batch_norm.apply_spatial[{name},{width},C]",
                         bn._spatial_apply(width), (c3, c3, c3, b1, b1, c2, c3), no_float64))
            sigs.append((f"batch_norm.partials_spatial[{name},{stat},{width},C]",
                         bn._spatial_partials(width),
                         (c3, c3, c3, b1, b1, c2, types.Array(PARAMS[stat], 1, "C"),
                          types.Array(PARAMS[stat], 1, "C"), i64, m64, m64, m64), None))
        f1 = types.Array(t, 1, "C")
        sigs.append((f"batch_norm._columns_apply[{name},C]", bn._columns_apply,
                     (f1, f1, f1, b1, b1, c2, f1, i64), no_float64))
        sigs.append((f"batch_norm._columns_partials[{name},{stat},C]", bn._columns_partials,
                     (f1, f1, f1, b1, b1, c2, types.Array(PARAMS[stat], 1, "C"),
                      types.Array(PARAMS[stat], 1, "C"), i64, i64, m64, m64, m64), None))
        sigs.append((f"batch_norm._partials[{name},{stat},C]", bn._partials,
                     (c3, c3, c3, b1, b1, c2, types.Array(PARAMS[stat], 1, "C"),
                      types.Array(PARAMS[stat], 1, "C"), i64, i64, m64, m64, m64), None))
        sigs.append((f"cross_entropy._ce_rows[{name},C]", ce._ce_rows,
                     (i64, c3, types.Array(i64, 1, "C"), c3, b1, c1, i64, f64, f64, f64,
                      types.Array(acc, 1, "C"), c1, c1, c3, c1), lse_split_only))
        if name != "float64":
            c2t = types.Array(t, 2, "C")
            for width in ce.DENSE_WIDTHS:
                sigs.append((f"cross_entropy.ce_dense_rows[{name},{width},C]",
                             ce._dense_kernel(width),
                             (i64, c2t, types.Array(i64, 1, "C"), c1, i64, f64, f64, f64, c1,
                              c1, c2t, c1), lse_split_only))
    # (C,) parameters of any floating dtype meet the two accumulation dtypes (x's dtype only
    # matters through it in these kernels).
    for pname, p in PARAMS.items():
        for name in ("float32", "float64"):
            t, acc = FLOATS[name], _acc(name)
            if pname != name:
                sigs.append((f"batch_norm._partials[{name},{pname}]", bn._partials,
                             (_arr3(t), _arr3(t), _arr3(t), b1, b1, _mat(acc), _vec(p), _vec(p),
                              i64, i64, _mat(f64), _mat(f64), _mat(f64)), None))
            sigs.append((f"batch_norm._forward_channels[{name},{pname}]", bn._forward_channels,
                         (_mat(f64), _mat(f64), _mat(f64), f64, b1, f64, _vec(p), _vec(p), b1,
                          f64, _vec(p), b1, _vec(p), b1, _vec(acc), _vec(acc), _mat(acc)),
                         None))
            sigs.append((f"batch_norm._normalize_coefficients[{name},{pname}]",
                         bn._normalize_coefficients,
                         (_vec(p), _vec(p), _vec(p), b1, _vec(p), b1, _mat(acc)), None))
            sigs.append((f"batch_norm._dx_coefficients[{name},{pname}]",
                         bn._dx_coefficients,
                         (_vec(p), _vec(p), _vec(p), b1, _vec(f64), _vec(f64), f64, b1,
                          _mat(acc)), None))
            sigs.append((f"batch_norm._backward_channels[{name},{pname}]",
                         bn._backward_channels,
                         (_mat(f64), _mat(f64), _vec(p), _vec(p), _vec(p), b1, f64, b1,
                          _mat(acc), _mat(acc)), None))
    for iname, it in (("int32", types.int32), ("int64", types.int64)):
        sigs.append((f"_arrays.convert[{iname}->int64]", _arrays.convert,
                     (_vec(it), _vec(i64)), None))
    sigs += [
        ("cross_entropy._first_bad_target", ce._first_bad_target,
         (_vec(i64), i64, i64, _vec(i64)), None),
        ("cross_entropy._target_weights", ce._target_weights,
         (_vec(i64), _vec(f64), i64, _vec(f64)), None),
        ("cross_entropy._fill", ce._fill, (_vec(f64), f64), None),
        ("cross_entropy._reduced_value[float32]", ce._reduced_value,
         (_vec(f64), _vec(f64), b1, _vec(types.float32)), None),
        ("cross_entropy._reduced_value[float64]", ce._reduced_value,
         (_vec(f64), _vec(f64), b1, _vec(f64)), None),
        ("batch_norm._merge_stat_parts", bn._merge_stat_parts,
         (_mat(f64), _mat(f64), _mat(f64), _vec(f64), _vec(f64)), None),
        ("batch_norm._sum_grad_parts", bn._sum_grad_parts,
         (_mat(f64), _mat(f64), _vec(f64), _vec(f64)), None),
        ("_reduce.sum_chunks", _reduce.sum_chunks,
         (_vec(f64), _vec(f64), i64), None),
    ]
    return sigs


@contextlib.contextmanager
def _target_device(cc):
    """Let device functions compile for ``cc`` without a driver (see the module docstring)."""
    from numba.cuda import dispatcher
    stand_in = SimpleNamespace(compute_capability=tuple(cc))
    with mock.patch.object(dispatcher, "get_current_device", lambda: stand_in):
        yield


def ptx_file_name(label: str) -> str:
    """File name of a signature's PTX: the label with anything but ``[\\w.,-]`` made ``_``."""
    return re.sub(r"[^\w.,-]+", "_", label).strip("_") + ".ptx"


def compile_all(cc=(9, 0), report=print, ptx_dir=None):
    """Compile every signature; returns a list of ``(label, error message or None)``.
    ``ptx_dir``: also write each signature's PTX there (:func:`ptx_file_name`), e.g. for
    ``ptxas`` / ``nvdisasm`` (docs/gpu.md, SASS census)."""
    if _simulated():
        raise RuntimeError("PTX compilation needs NUMBA_ENABLE_CUDASIM unset (not the simulator)")
    results = []
    with _target_device(cc):
        for label, kernel, argtypes, float64_budget in kernel_signatures():
            start = time.perf_counter()
            try:
                options = kernel.targetoptions
                ptx, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=tuple(cc),
                                          fastmath=options.get("fastmath", False),
                                          launch_bounds=options.get("launch_bounds"))
                if ptx_dir is not None:
                    with open(os.path.join(ptx_dir, ptx_file_name(label)), "w") as f:
                        f.write(ptx)
                error = None
                found = [m.group(0).strip() for m in _FLOAT64_ARITHMETIC.finditer(ptx)]
                if float64_budget is not None and len(found) > float64_budget:
                    error = (f"{len(found)} float64 arithmetic instructions in a "
                             f"float32-accumulating kernel (at most {float64_budget}): "
                             + ", ".join(sorted(set(found))))
            except Exception as exc:  # report every failing signature, not just the first
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            results.append((label, error))
            report(f"{'FAIL' if error else 'ok  '} {label} ({time.perf_counter() - start:.1f}s)"
                   + (f": {error}" if error else ""))
    return results


def _simulated() -> bool:
    from ._target import SIMULATED
    return SIMULATED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0")
    parser.add_argument("--ptx-dir", help="write each signature's PTX into this folder")
    args = parser.parse_args(argv)
    cc = tuple(int(v) for v in args.cc.split("."))
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    results = compile_all(cc, ptx_dir=args.ptx_dir)
    failed = [label for label, error in results if error]
    print(f"{len(results) - len(failed)}/{len(results)} kernel signatures compiled to PTX "
          f"for cc {cc[0]}.{cc[1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
