"""One helper that turns a kernel module's host functions into a ``torch.library`` op with autograd.

Every op is two custom ops, ``opt_core::<name>_fwd`` and ``opt_core::<name>_bwd``, so ``torch.compile``
sees one node per direction instead of a graph break.  Each direction runs its Triton launch or its
plain-PyTorch path as ``dispatch.use_triton`` decides, has a fake (shapes only, for tracing), and the
forward op's autograd formula calls the backward op.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

import torch

from opt_core.kernels import dispatch


@dataclasses.dataclass(frozen=True)
class Direction:
    """One of an op's two custom ops.

    ``kernel`` launches the Triton kernels, ``reference`` is the plain-PyTorch path; both take the custom
    op's arguments (each reads the ones it needs), and ``kernel``'s annotations are the op's schema.
    ``fake`` takes the same arguments and returns empty outputs of the right shapes.  ``chosen_by`` names
    the tensor argument whose dtype and device choose between the two paths.
    """

    kernel: Callable
    reference: Callable
    fake: Callable
    chosen_by: str


def register_op(
    name: str,
    *,
    dtypes: Sequence[torch.dtype],
    forward: Direction,
    backward: Direction,
    setup_context: Callable,
    gradients: Callable,
) -> None:
    """Define ``opt_core::<name>_fwd`` and ``opt_core::<name>_bwd`` (their kernels run for ``dtypes``) and
    make the forward differentiable: ``setup_context(ctx, inputs, output)`` saves what the backward needs,
    ``gradients(ctx, *output_grads)`` calls the backward op and returns one gradient (or None) per input."""
    forward_op = _custom_op(f"opt_core::{name}_fwd", forward, tuple(dtypes))
    _custom_op(f"opt_core::{name}_bwd", backward, tuple(dtypes))
    forward_op.register_autograd(gradients, setup_context=setup_context)


def _custom_op(qualname: str, direction: Direction, dtypes: tuple) -> torch.library.CustomOpDef:
    signature = inspect.signature(direction.kernel)
    if direction.chosen_by not in signature.parameters:
        raise ValueError(f"{qualname}: chosen_by={direction.chosen_by!r} is not an argument of "
                         f"{direction.kernel.__name__}{signature}")

    def run(*args, **kwargs):
        chooser = signature.bind(*args, **kwargs).arguments[direction.chosen_by]
        if dispatch.use_triton(chooser, dtypes):
            with dispatch.device_guard(chooser):
                return direction.kernel(*args, **kwargs)
        return direction.reference(*args, **kwargs)

    schema = torch.library.infer_schema(direction.kernel, mutates_args=())
    op = torch.library.custom_op(qualname, run, mutates_args=(), schema=schema)
    op.register_fake(direction.fake)
    return op
