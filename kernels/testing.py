"""The numerics rule every kernel is held to (DESIGN.md, FlashAttention's rule).

A fused result is compared with the op computed in float64 (the oracle).  Its
error may be at most ``factor`` times the error of plain PyTorch run in the
same low precision on the same inputs, plus a floor of one unit in the last
place of the output dtype at the reference's magnitude, for the cases where
PyTorch happens to be exact.  ``factor`` is 2 for forward outputs, 3 for
gradients.  Non-finite values must sit exactly where the reference has them.

Used by the test suite and by the main job's correctness check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float        # max |ours - reference|
    torch_error: float  # max |plain PyTorch in low precision - reference|
    bound: float        # factor * torch_error + floor
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: error {self.error:.3e} vs PyTorch {self.torch_error:.3e}, "
                f"bound {self.bound:.3e} [{verdict}]{' ' + self.detail if self.detail else ''}")


def _max_abs_error(value: torch.Tensor, reference: torch.Tensor, finite: torch.Tensor) -> float:
    if not bool(finite.any()):
        return 0.0
    return (value.double()[finite] - reference[finite]).abs().max().item()


def compare(
    name: str,
    ours: torch.Tensor,
    reference: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    factor: float,
) -> Comparison:
    """Check ``ours`` against the float64 ``reference``, scaled by ``torch_lowp``'s error."""
    reference = reference.detach().to(device=ours.device, dtype=torch.float64)
    ours, torch_lowp = ours.detach(), torch_lowp.detach()
    if ours.shape != reference.shape:
        return Comparison(name, float("inf"), float("nan"), 0.0, False,
                          f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}")
    for what, a, b in (("NaN", ours.isnan(), reference.isnan()), ("inf", ours.isinf(), reference.isinf())):
        if not torch.equal(a, b):
            extra, missing = int((a & ~b).sum()), int((b & ~a).sum())
            return Comparison(name, float("inf"), float("nan"), 0.0, False,
                              f"{what} mismatch: {extra} unexpected, {missing} missing")
    finite = torch.isfinite(reference)
    if not torch.equal(ours[ours.isinf()], reference[reference.isinf()].to(ours.dtype)):
        return Comparison(name, float("inf"), float("nan"), 0.0, False, "inf of the wrong sign")
    error = _max_abs_error(ours, reference, finite)
    torch_error = _max_abs_error(torch_lowp, reference, finite & torch.isfinite(torch_lowp.double()))
    magnitude = reference[finite].abs().max().item() if bool(finite.any()) else 0.0
    floor = torch.finfo(ours.dtype).eps * max(magnitude, torch.finfo(ours.dtype).tiny)
    bound = factor * torch_error + floor
    return Comparison(name, error, torch_error, bound, error <= bound)


def assert_close_to_reference(
    name: str,
    ours: torch.Tensor,
    reference: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    factor: float = FORWARD_FACTOR,
) -> Comparison:
    result = compare(name, ours, reference, torch_lowp, factor=factor)
    if not result.ok:
        raise AssertionError(str(result))
    return result
