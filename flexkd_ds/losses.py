"""Loss functions of Flex-KD and its baselines. Pure torch: tensors in, tensors out, fp32 accumulation.

Nothing here knows about processes or ranks. Where a loss can be made exact over several data-parallel
ranks, it takes an optional ``all_reduce`` callable (``tensor -> summed tensor``) that the engine supplies.

Correlation loss (Flex-KD, DESIGN.md "The method" 3)
-----------------------------------------------------
Rows are the valid token positions of the batch. For each student unit m the teacher column ``E[m]`` and
the student column m are centred over the rows and compared by Pearson correlation::

    C_m    = <t_m - mean(t_m), s_m - mean(s_m)> / (max(||t_m - mean||, eps) * max(||s_m - mean||, eps))
    L_flex = sum_m (1 - C_m)^2

It is computed from per-column *shifted* sums (the sufficient statistics): for a shift K per column,
``n, sum(t-K_t), sum(s-K_s), sum((t-K_t)^2), sum((s-K_s)^2), sum((t-K_t)(s-K_s))``. Sums add across row
blocks and ranks, so a global-batch loss is one all-reduce away. With the shift close to the column mean the
centred second moments ``S_xy = sum((x-K)(y-K)) - sum(x-K) sum(y-K) / n`` lose no precision even for
massive-activation columns (|mean| in the hundreds, std below one), where the raw ``sum(x^2) - sum(x)^2/n``
in fp32 would return noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]

# Row order of the stacked statistics tensor (6, d_S) returned by ``correlation_stats``.
STAT_NAMES = ("count", "sum_t", "sum_s", "sum_tt", "sum_ss", "sum_ts")
_N, _ST, _SS, _STT, _SSS, _STS = range(6)


def check_correlation_inputs(
    teacher_hidden: Tensor, student_hidden: Tensor, unit_indices: Tensor, valid_mask: Tensor | None
) -> None:
    """Raise ``ValueError`` naming the problem when the correlation inputs do not fit together.

    Shared by the torch reference and the Triton path so both refuse exactly the same inputs.
    """
    if teacher_hidden.dim() < 2 or student_hidden.dim() < 2:
        raise ValueError(
            f"teacher_hidden and student_hidden need shape (..., d); got {tuple(teacher_hidden.shape)} "
            f"and {tuple(student_hidden.shape)}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden {tuple(student_hidden.shape)} "
            "must agree in every dimension but the last (same batch and sequence positions)"
        )
    d_teacher, d_student = teacher_hidden.shape[-1], student_hidden.shape[-1]
    if unit_indices.dim() != 1 or unit_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"unit_indices must be a 1-D integer tensor; got shape {tuple(unit_indices.shape)} "
            f"dtype {unit_indices.dtype}"
        )
    if unit_indices.numel() != d_student:
        raise ValueError(
            f"len(unit_indices) = {unit_indices.numel()} must equal the student width d_S = {d_student}"
        )
    if unit_indices.numel() > 0:
        low, high = int(unit_indices.min()), int(unit_indices.max())
        if low < 0 or high >= d_teacher:
            raise ValueError(
                f"unit_indices must lie in [0, d_T = {d_teacher}); got values in [{low}, {high}]"
            )
        if torch.unique(unit_indices).numel() != unit_indices.numel():
            raise ValueError("unit_indices contains duplicate teacher units; each unit may be selected once")
    if valid_mask is not None:
        if valid_mask.shape != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"valid_mask {tuple(valid_mask.shape)} must have the shape of the hidden states without "
                f"their last dimension, {tuple(teacher_hidden.shape[:-1])}"
            )
        if valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask must be a bool tensor; got {valid_mask.dtype}")


def accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck, references); every other float dtype accumulates in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _valid_rows(hidden: Tensor, valid_mask: Tensor | None) -> Tensor:
    """(..., d) -> (N_valid, d): the rows the correlation is taken over."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if valid_mask is None:
        return rows
    return rows[valid_mask.reshape(-1)]


def correlation_stats(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
    *,
    shift_teacher: Tensor | None = None,
    shift_student: Tensor | None = None,
) -> Tensor:
    """Per-column shifted sums over the valid rows, stacked as a float32 tensor of shape (6, d_S).

    Rows (see ``STAT_NAMES``): count, sum(t-K_t), sum(s-K_s), sum((t-K_t)^2), sum((s-K_s)^2),
    sum((t-K_t)(s-K_s)).

    Args:
        teacher_hidden: (..., d_T), any float dtype; read only at ``unit_indices``; never receives gradient.
        student_hidden: (..., d_S), any float dtype; the gradient flows back to it.
        unit_indices: (d_S,) int, teacher unit for each student unit, in rank order.
        valid_mask: (...) bool, True for rows to use; None uses every row.
        shift_teacher, shift_student: (d_S,) float32 shifts K. The same shift must be used on every rank
            whose sums are added. None: the column means of these rows (two-pass, exact centring).
    """
    acc = accumulation_dtype(student_hidden)
    teacher_rows = _valid_rows(teacher_hidden.detach(), valid_mask)[:, unit_indices].to(acc)  # (N, d_S)
    student_rows = _valid_rows(student_hidden, valid_mask).to(acc)  # (N, d_S)
    num_rows = teacher_rows.shape[0]
    if shift_teacher is None:
        shift_teacher = teacher_rows.mean(0) if num_rows else teacher_rows.new_zeros(teacher_rows.shape[1])
    if shift_student is None:
        shift_student = (
            student_rows.detach().mean(0) if num_rows else student_rows.new_zeros(student_rows.shape[1])
        )
    t = teacher_rows - shift_teacher.to(acc)
    s = student_rows - shift_student.to(acc)
    count = student_rows.new_full((student_rows.shape[1],), float(num_rows))
    return torch.stack([count, t.sum(0), s.sum(0), (t * t).sum(0), (s * s).sum(0), (t * s).sum(0)])


def correlation_from_stats(stats: Tensor, *, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Loss ``sum_m (1 - C_m)^2`` and the per-unit correlations ``C`` (d_S,) from summed statistics.

    ``stats`` is (6, d_S) as returned by ``correlation_stats`` (possibly summed over ranks). Raises
    ``ValueError`` when fewer than 2 rows were counted.
    """
    stats = stats.to(accumulation_dtype(stats))
    num_rows = float(stats[_N, 0].detach())
    if num_rows < 2:
        raise ValueError(
            f"the correlation loss needs at least 2 valid rows (tokens) to centre over; got {int(num_rows)}"
        )
    n = stats[_N]
    mean_t, mean_s = stats[_ST] / n, stats[_SS] / n
    # Centred second moments from the shifted sums; clamp rounding below zero for the norms.
    cov_ts = stats[_STS] - stats[_ST] * mean_s
    var_t = (stats[_STT] - stats[_ST] * mean_t).clamp_min(0.0)
    var_s = (stats[_SSS] - stats[_SS] * mean_s).clamp_min(0.0)
    # max(sqrt(v), eps) written as sqrt(max(v, eps^2)) so the gradient of sqrt never sees 0.
    norm_t = var_t.clamp_min(eps * eps).sqrt()
    norm_s = var_s.clamp_min(eps * eps).sqrt()
    corr = cov_ts / (norm_t * norm_s)
    return ((1.0 - corr) ** 2).sum(), corr


def correlation_loss(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
    *,
    eps: float = 1e-6,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Flex-KD correlation loss ``sum_m (1 - C_m)^2`` (plain-torch reference). Returns a float32 scalar.

    Args:
        teacher_hidden: (..., d_T) teacher last hidden state, any float dtype and layout; frozen (no grad).
        student_hidden: (..., d_S) student last hidden state; gradient flows here.
        unit_indices: (d_S,) int64 selected teacher units, student unit m pairs with teacher unit
            ``unit_indices[m]``.
        valid_mask: (...) bool, the rows (tokens) to correlate over; None means all rows.
        eps: lower bound on each centred column norm (a constant column gives C = 0, not NaN).
        all_reduce: optional ``tensor -> tensor`` summing across data-parallel ranks. When given, the loss
            is the one on the union of all ranks' rows (``correlation_scope: global``): every rank returns
            the same value and its backward yields its own rows' share of the global gradient.

    Raises:
        ValueError: len(unit_indices) != d_S, an index outside [0, d_T), duplicate indices, shapes that
            disagree, or fewer than 2 valid rows (in total over ranks when ``all_reduce`` is given).
    """
    check_correlation_inputs(teacher_hidden, student_hidden, unit_indices, valid_mask)
    if all_reduce is None:
        stats = correlation_stats(teacher_hidden, student_hidden, unit_indices, valid_mask)
    else:
        stats = _global_stats(teacher_hidden, student_hidden, unit_indices, valid_mask, all_reduce)
    loss, _ = correlation_from_stats(stats, eps=eps)
    return loss


def _global_stats(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None,
    all_reduce: AllReduce,
) -> Tensor:
    """Statistics summed over ranks, differentiable w.r.t. this rank's student rows."""
    shift_teacher, shift_student = common_shift(
        teacher_hidden, student_hidden, unit_indices, valid_mask, all_reduce
    )
    local = correlation_stats(
        teacher_hidden,
        student_hidden,
        unit_indices,
        valid_mask,
        shift_teacher=shift_teacher,
        shift_student=shift_student,
    )
    return sum_with_local_grad(local, all_reduce)


def common_shift(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None,
    all_reduce: AllReduce,
) -> tuple[Tensor, Tensor]:
    """One shift per column shared by all ranks: the mean over ranks of each rank's local column means.

    Any value near the global mean keeps the shifted sums well conditioned; this one costs one small
    all-reduce of (2 d_S + 1) numbers and is identical on every rank.
    """
    acc = accumulation_dtype(student_hidden)
    teacher_rows = _valid_rows(teacher_hidden.detach(), valid_mask)[:, unit_indices].to(acc)
    student_rows = _valid_rows(student_hidden.detach(), valid_mask).to(acc)
    has_rows = float(teacher_rows.shape[0] > 0)
    local = torch.cat(
        [
            teacher_rows.mean(0) if has_rows else teacher_rows.new_zeros(teacher_rows.shape[1]),
            student_rows.mean(0) if has_rows else student_rows.new_zeros(student_rows.shape[1]),
            teacher_rows.new_full((1,), has_rows),
        ]
    )
    total = all_reduce(local.clone())
    ranks_with_rows = total[-1].clamp_min(1.0)
    d_student = student_rows.shape[1]
    return total[:d_student] / ranks_with_rows, total[d_student : 2 * d_student] / ranks_with_rows


def sum_with_local_grad(local: Tensor, all_reduce: AllReduce) -> Tensor:
    """``all_reduce(local)`` in value, with the gradient of ``local`` (identity) in backward.

    Each rank then back-propagates d(global loss)/d(its own rows); the engine sums those over ranks.
    """
    total = all_reduce(local.detach().clone())
    return local + (total - local.detach())
