"""Workarounds for defects of Triton's CPU interpreter, applied in one place.

Only used when ``TRITON_INTERPRET=1`` (``opt_core.kernels.dispatch`` calls ``apply()``
then); compiled kernels are untouched.  Each fix makes the interpreter compute
what the compiled kernel computes on a GPU, so the CPU suite tests the kernels
and not the interpreter's quirks.  Seen with Triton 3.6; re-check on upgrades.

1. bf16 ``tl.dot`` (Triton 3.6 to 3.9): the interpreter keeps bf16 values as
   their raw uint16 bit patterns and hands those straight to ``np.matmul``, so
   a bf16 dot multiplies bit patterns (errors around 1e9).  Widening bf16
   operands to fp32 first (a bf16 is the top half of an fp32) gives exact
   products, as the tensor cores do.
2. fp32 -> bf16 casts (Triton 3.6): the interpreter truncates; compiled Triton
   rounds to nearest even.  Truncation doubles the rounding error of every bf16
   store, which a numerics test would otherwise blame on the kernel.
3. ``tl.maximum``/``tl.minimum`` without ``propagate_nan`` (Triton 3.6): on
   a GPU they lower to maxnum/minnum, which return the other operand when one
   is NaN; the interpreter used np.maximum/np.minimum, which propagate it.  A
   kernel that drops NaN on the GPU (a ReLU written as tl.maximum(x, 0)
   hiding an fp16 overflow from the loss scaler) passed its CPU NaN tests.
   Now np.fmax/np.fmin, the GPU's semantics.  (``tl.max`` reductions already
   used np.nanmax.)
4. ``tl.dot``'s summation order (any Triton): the interpreter hands every dot
   to ``np.matmul`` in the accumulator's dtype, so an fp32 result depends on
   which OpenBLAS kernel the host CPU selects.  The same seeded test gave
   dV errors of 7.1e-6 with the Haswell/Zen kernels and 2.3e-6 with the
   SkylakeX one (``test_custom_softmax_scale``: the backward recomputes
   S = K Q^T, the forward Q K^T, and a peaky softmax turns any difference
   between the two into an error of P that the log-sum-exp does not absorb),
   so a failure did not replay from one machine to the next.  Now each dot is
   summed in float64 and rounded once into the accumulator's dtype: the same
   bits on every CPU, and the rounding left to measure is the kernel's own
   (its casts, its fp32 accumulator carried from block to block).  A GPU's
   tensor cores round more often inside one product; the ``gpu`` tests hold
   the compiled kernels to the rule there.
5. NumPy >= 2.4 with Triton < 3.8: the interpreter turns loop bounds into ints
   with ``int()`` of a 1-element array, which NumPy 2.4 refuses; every kernel
   with a runtime loop would die with a message about scalars.  Not patched:
   refused up front with the fix in the message.
"""

from __future__ import annotations

import numpy as np

_APPLIED = False


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns of fp32 values, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
    return np.where(np.isnan(x), quiet_nan, rounded)


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    if _version(triton.__version__) < (3, 8) and _version(np.__version__) >= (2, 4):
        raise ImportError(
            f"TRITON_INTERPRET=1 with triton {triton.__version__} needs numpy<2.4 "
            f"(found numpy {np.__version__}): pip install 'numpy<2.4'"
        )

    builder = interpreter.InterpreterBuilder
    handle = interpreter.TensorHandle

    def widen_bf16(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << np.uint32(16)
        return handle(bits.view(np.float32), tl.float32)

    create_dot = builder.create_dot

    def dot_rounded_once(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = widen_bf16(a), widen_bf16(b)
        if not (d.dtype.scalar.is_floating() and d.dtype.scalar.primitive_bitwidth in (16, 32)
                and a.dtype.scalar.primitive_bitwidth > 8 and b.dtype.scalar.primitive_bitwidth > 8):
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data.astype(np.float64)
        return handle(exact.astype(d.data.dtype), d.dtype.scalar)

    cast_impl = builder.cast_impl

    def cast_rounding_to_nearest(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(fp32_to_bf16_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot = dot_rounded_once
    builder.cast_impl = cast_rounding_to_nearest
    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
    _APPLIED = True
