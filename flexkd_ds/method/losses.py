"""Loss functions of Flex-KD and its baselines. Pure torch: tensors in, tensors out, fp32 accumulation.

Nothing here knows about processes or ranks. Where a loss can be made exact over several data-parallel
ranks, it takes an optional ``all_reduce`` callable (``tensor -> summed tensor``) that the engine supplies.

Correlation loss (Flex-KD, DESIGN.md "The method" 3)
-----------------------------------------------------
Rows are the valid token positions of the batch. For each student unit m the teacher column ``E[m]`` and
the student column m are centred over the rows and compared by Pearson correlation::

    C_m    = <t_m - mean(t_m), s_m - mean(s_m)> / (max(||t_m - mean||, eps) * max(||s_m - mean||, eps))
    L_flex = sum_m (1 - C_m)^2

It is computed from per-column *moments* ``(n, mean_t, mean_s, M2_t, M2_s, C_ts)``, with M2 and C the
centred sums of squares and cross-products. Moments of disjoint row sets merge exactly (Chan et al.), so
the loss over a whole global batch needs two small all-reduces and never the raw
``sum(x^2) - sum(x)^2 / n``, which in fp32 returns noise for massive-activation columns (|mean| in the
hundreds, std below one).

Further below: the logit divergences of ``L_logit`` and the LM loss of ``L_sup`` (token sums, so one place
owns normalisation), and the feature baselines (linear CKA, learned projector + MSE).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]

# Row order of the stacked moments tensor (6, d_S).
MOMENT_NAMES = ("count", "mean_t", "mean_s", "m2_t", "m2_s", "c_ts")
_N, _MT, _MS, _M2T, _M2S, _CTS = range(6)


def _check_paired_shapes(teacher_hidden: Tensor, student_hidden: Tensor) -> None:
    """(..., d_T) and (..., d_S) with the same leading dimensions, or ``ValueError`` naming both shapes."""
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


def check_correlation_inputs(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None,
    *,
    units_checked: bool = False,
) -> None:
    """Raise ``ValueError`` naming the problem when the correlation inputs do not fit together.

    Shared by the torch reference and the Triton path so both refuse exactly the same inputs.
    ``units_checked=True``: ``unit_indices`` already passed ``check_unit_indices`` for these widths (the
    trainer checks its fixed selection once), so the range and duplicate checks, host syncs on a GPU, are
    skipped; the shapes are still checked.
    """
    _check_paired_shapes(teacher_hidden, student_hidden)
    d_teacher, d_student = teacher_hidden.shape[-1], student_hidden.shape[-1]
    if units_checked:
        if unit_indices.dim() != 1 or unit_indices.numel() != d_student:
            raise ValueError(
                f"unit_indices has shape {tuple(unit_indices.shape)}; it must be ({d_student},), one per student unit"
            )
    else:
        check_unit_indices(unit_indices, d_teacher, d_student)
    if valid_mask is not None:
        if valid_mask.shape != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"valid_mask {tuple(valid_mask.shape)} must have the shape of the hidden states without "
                f"their last dimension, {tuple(teacher_hidden.shape[:-1])}"
            )
        if valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask must be a bool tensor; got {valid_mask.dtype}")


def check_unit_indices(unit_indices: Tensor, d_teacher: int, d_student: int) -> None:
    """``ValueError`` unless ``unit_indices`` is a 1-D integer tensor of d_S distinct units in [0, d_T)."""
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


def accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck, references); every other float dtype accumulates in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _valid_rows(hidden: Tensor, valid_mask: Tensor | None) -> Tensor:
    """(..., d) -> (N_valid, d): the rows the correlation is taken over."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if valid_mask is None:
        return rows
    return rows[valid_mask.reshape(-1)]


def correlation_moments(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Per-column moments over the valid rows, stacked as a tensor of shape (6, d_S).

    Rows (see ``MOMENT_NAMES``): count n, mean_t, mean_s, M2_t = sum((t - mean_t)^2),
    M2_s = sum((s - mean_s)^2), C_ts = sum((t - mean_t)(s - mean_s)). Two passes (mean, then centred
    sums), float32 accumulation (float64 for float64 input). No rows gives zeros everywhere.

    Args:
        teacher_hidden: (..., d_T), any float dtype; read only at ``unit_indices``; never receives gradient.
        student_hidden: (..., d_S), any float dtype; the gradient flows back to it.
        unit_indices: (d_S,) int, teacher unit for each student unit, in rank order.
        valid_mask: (...) bool, True for rows to use; None uses every row.
    """
    acc = accumulation_dtype(student_hidden)
    teacher_rows = _valid_rows(teacher_hidden.detach(), valid_mask)[:, unit_indices].to(acc)  # (N, d_S)
    student_rows = _valid_rows(student_hidden, valid_mask).to(acc)  # (N, d_S)
    num_rows = teacher_rows.shape[0]
    count = student_rows.new_full((student_rows.shape[1],), float(num_rows))
    if num_rows == 0:
        zeros = student_rows.sum(0)  # zeros that stay attached to the graph
        return torch.stack([count, zeros, zeros, zeros, zeros, zeros])
    mean_t, mean_s = teacher_rows.mean(0), student_rows.mean(0)
    t = teacher_rows - mean_t
    s = student_rows - mean_s
    return torch.stack([count, mean_t, mean_s, (t * t).sum(0), (s * s).sum(0), (t * s).sum(0)])


def combine_moments(moments: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """Exact merge of moments of disjoint row sets (Chan et al.).

    Args:
        moments: (P, 6, d_S) moments of P row blocks to merge here, or (6, d_S) with ``all_reduce``.
        all_reduce: ``tensor -> tensor`` summing over ranks. When given, the merge runs over ranks: every
            rank gets the global moments in value, and the gradient of its own rows in backward.

    The merged mean is used detached when centring the block means: d(M2)/d(mean) is exactly zero at the
    merged mean, so the gradient stays exact.
    """

    def total(x: Tensor) -> Tensor:  # sum over the blocks: here (dim 0) or over ranks
        return x.sum(0) if all_reduce is None else sum_with_local_grad(x, all_reduce)

    parts = moments
    n, mean_t, mean_s = parts[..., _N, :], parts[..., _MT, :], parts[..., _MS, :]
    first = total(torch.stack([n, n * mean_t, n * mean_s], dim=-2))
    count = first[0]
    safe_count = count.clamp_min(1.0)
    merged_mean_t, merged_mean_s = first[1] / safe_count, first[2] / safe_count
    dt = mean_t - merged_mean_t.detach()
    ds = mean_s - merged_mean_s.detach()
    second = total(
        torch.stack(
            [
                parts[..., _M2T, :] + n * dt * dt,
                parts[..., _M2S, :] + n * ds * ds,
                parts[..., _CTS, :] + n * dt * ds,
            ],
            dim=-2,
        )
    )
    return torch.stack([count, merged_mean_t, merged_mean_s, second[0], second[1], second[2]])


def correlation_from_moments(
    moments: Tensor, *, eps: float = 1e-6, check_rows: bool = True
) -> tuple[Tensor, Tensor]:
    """Loss ``sum_m (1 - C_m)^2`` and the per-unit correlations ``C`` (d_S,) from (6, d_S) moments.

    Raises ``ValueError`` when fewer than 2 rows were counted; ``check_rows=False`` skips that check (it reads
    the count on the host, a sync on a GPU): fewer than 2 rows then give C = 0 for every unit, no gradient.
    """
    moments = moments.to(accumulation_dtype(moments))
    num_rows = float(moments[_N, 0].detach()) if check_rows else 2.0
    if num_rows < 2:
        raise ValueError(
            f"the correlation loss needs at least 2 valid rows (tokens) to centre over; got {int(num_rows)}"
        )
    # max(sqrt(M2), eps) written as sqrt(max(M2, eps^2)) so the gradient of sqrt never sees 0.
    norm_t = moments[_M2T].clamp_min(eps * eps).sqrt()
    norm_s = moments[_M2S].clamp_min(eps * eps).sqrt()
    # A column constant up to rounding (std <= eps * max(1, |mean|): float32 leaves residuals of about
    # |mean| * 1e-7 around a constant) has no correlation: C = 0 with no gradient. Dividing by eps instead
    # would give it a 1/eps-sized gradient that, after clipping, drowns every other unit's update.
    n = moments[_N]
    floor_t = n * (eps * moments[_MT].abs().clamp_min(1.0)) ** 2
    floor_s = n * (eps * moments[_MS].abs().clamp_min(1.0)) ** 2
    degenerate = (moments[_M2T] <= floor_t) | (moments[_M2S] <= floor_s)
    corr = torch.where(degenerate, torch.zeros_like(norm_s), moments[_CTS] / (norm_t * norm_s))
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
        eps: a column whose std is at most ``eps * max(1, |mean|)`` (constant up to rounding) counts as
            C = 0 and gets no gradient.
        all_reduce: optional ``tensor -> tensor`` summing across data-parallel ranks. When given, the loss
            is the one on the union of all ranks' rows (``correlation_scope: global``): every rank returns
            the same value and its backward yields its own rows' share of the global gradient.

    Raises:
        ValueError: len(unit_indices) != d_S, an index outside [0, d_T), duplicate indices, shapes that
            disagree, or fewer than 2 valid rows (in total over ranks when ``all_reduce`` is given).
    """
    check_correlation_inputs(teacher_hidden, student_hidden, unit_indices, valid_mask)
    moments = correlation_moments(teacher_hidden, student_hidden, unit_indices, valid_mask)
    if all_reduce is not None:
        moments = combine_moments(moments, all_reduce)
    loss, _ = correlation_from_moments(moments, eps=eps)
    return loss


def sum_with_local_grad(local: Tensor, all_reduce: AllReduce) -> Tensor:
    """``all_reduce(local)`` in value, with the gradient of ``local`` (identity) in backward.

    Each rank then back-propagates d(global loss)/d(its own rows); the engine sums those over ranks.
    """
    total = all_reduce(local.detach().clone())
    return local + (total - local.detach())


# --- Shared helpers for the token-level losses below -----------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def _check_valid_mask(valid_mask: Tensor | None, token_shape: torch.Size, what: str) -> None:
    """``valid_mask`` must be None or a bool tensor of shape ``token_shape`` (the tokens of ``what``)."""
    if valid_mask is None:
        return
    if valid_mask.dtype != torch.bool:
        raise ValueError(f"valid_mask must be a bool tensor; got {valid_mask.dtype}")
    if valid_mask.shape != token_shape:
        raise ValueError(
            f"valid_mask {tuple(valid_mask.shape)} must have the token shape of {what}, {tuple(token_shape)}"
        )


def _check_reduction(reduction: str, allowed: tuple[str, ...]) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}; got {reduction!r}")


def _reduce_tokens(per_token: Tensor, reduction: str, loss_name: str) -> Tensor:
    """(N,) values of the valid tokens -> sum, or mean (ValueError when N = 0). The sum of no tokens is a
    zero attached to the graph: a rank with no valid token still runs backward like every other rank."""
    total = per_token.sum()
    if reduction == "sum":
        return total
    num_tokens = per_token.shape[0]
    if num_tokens == 0:
        raise ValueError(
            f"{loss_name} with reduction='mean' got no valid token (every position masked or ignored); "
            "use reduction='sum' and normalise by the global token count"
        )
    return total / num_tokens


# --- Logit divergences (DESIGN.md "The method" 4: L_logit) and the supervised LM loss --------------------

LOGIT_DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dim, 0 log 0 = 0: entries with a_v = 0 give 0
    (also where log b_v = -inf) and no NaN in backward (``where`` zeroes the discarded branch's gradient)."""
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * log_ratio).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b) elementwise in log space (logaddexp), 0 <= w <= 1. Where a = b = 0: -inf with a
    zero (not NaN) gradient, by feeding finite dummies to logaddexp there and putting -inf back."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    x, y = log_a + log_w, log_b + log_1mw
    both_zero = torch.isneginf(x) & torch.isneginf(y)
    mixed = torch.logaddexp(torch.where(both_zero, 0.0, x), torch.where(both_zero, 0.0, y))
    return torch.where(both_zero, -math.inf, mixed)


def _divergence_per_token(log_p: Tensor, log_q: Tensor, kind: str, skew: float, jsd_beta: float) -> Tensor:
    """(N, V) teacher log p and student log q -> (N,) divergence of each token."""
    if kind == "fkl" or (kind == "jsd" and jsd_beta == 0.0) or (kind == "skew_fkl" and skew == 0.0):
        return _kl(log_p, log_q)
    if kind == "rkl" or (kind == "jsd" and jsd_beta == 1.0) or (kind == "skew_rkl" and skew == 0.0):
        return _kl(log_q, log_p)
    if kind == "jsd":  # GKD: m = beta p + (1 - beta) q
        log_m = _log_mixture(log_p, log_q, jsd_beta)
        return jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)
    if kind == "skew_fkl":  # DistiLLM: KL(p || a p + (1 - a) q)
        return _kl(log_p, _log_mixture(log_p, log_q, skew))
    if kind == "skew_rkl":  # DistiLLM: KL(q || (1 - a) p + a q)
        return _kl(log_q, _log_mixture(log_q, log_p, skew))
    # tvd
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def logit_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    valid_mask: Tensor | None,
    *,
    kind: str,
    temperature: float = 1.0,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """Divergence between the teacher's and the student's next-token distributions, per valid token.

    ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``, both from ``log_softmax`` in float32
    (float64 for float64 student logits); no T^2 factor. Kinds (``LOGIT_DIVERGENCES``):

    - ``fkl``: KL(p || q);  ``rkl``: KL(q || p) (MiniLLM).
    - ``jsd``: GKD/TRL generalised JSD, m = beta p + (1 - beta) q, beta KL(p || m) + (1 - beta) KL(q || m);
      beta = 0 is fkl and beta = 1 is rkl (the formula itself degenerates to 0 there).
    - ``skew_fkl``: KL(p || a p + (1 - a) q);  ``skew_rkl``: KL(q || (1 - a) p + a q), a = ``skew`` (DistiLLM).
    - ``tvd``: 0.5 sum_v |p_v - q_v|.

    Zero-probability entries follow 0 log 0 = 0, so a teacher with -inf logits gives finite values for
    every kind except those that are infinite in exact arithmetic: KL(q || p) (``rkl``, ``jsd`` with
    beta = 1, ``skew_rkl`` with a = 0) is +inf when the student puts mass where the teacher has none.

    Args:
        student_logits: (..., V) any float dtype; the gradient flows here.
        teacher_logits: (..., V) any float dtype; detached (the teacher gets no gradient).
        valid_mask: (...) bool, the tokens to distil on (response tokens); None means every token.
        kind: one of ``LOGIT_DIVERGENCES``; temperature: T > 0, divides both logits;
        skew: a in [0, 1] for the skewed KLs; jsd_beta: beta in [0, 1] for ``jsd``.
        reduction: ``sum`` over valid tokens (the engine divides by the global token count), ``mean`` (that
            sum / number of valid tokens; ValueError when there is none), or ``none``: (...) per-token
            values with zeros at invalid positions.

    Returns: float32 (float64 for float64 student logits) scalar, or (...) for ``reduction="none"``.
    """
    if kind not in LOGIT_DIVERGENCES:
        raise ValueError(f"kind must be one of {LOGIT_DIVERGENCES}; got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must lie in [0, 1]; got {skew}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must lie in [0, 1]; got {jsd_beta}")
    _check_reduction(reduction, REDUCTIONS)
    if student_logits.dim() < 1 or student_logits.shape != teacher_logits.shape:
        if student_logits.dim() >= 1 and student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            raise ValueError(
                f"vocabulary sizes differ: student V={student_logits.shape[-1]}, teacher "
                f"V={teacher_logits.shape[-1]}; logit distillation needs the same vocabulary"
            )
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., V)"
        )
    _check_valid_mask(valid_mask, student_logits.shape[:-1], "the logits")

    acc = accumulation_dtype(student_logits)
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)  # (N_all, V)
    teacher_rows = teacher_logits.detach().reshape(-1, vocab)
    if valid_mask is not None:  # drop masked rows first: no work, and no NaN from padding rows
        flat_mask = valid_mask.reshape(-1)
        student_rows, teacher_rows = student_rows[flat_mask], teacher_rows[flat_mask]  # (N, V)
    log_q = torch.log_softmax(student_rows.to(acc) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_rows.to(acc) / temperature, dim=-1)
    per_token = _divergence_per_token(log_p, log_q, kind, skew, jsd_beta)  # (N,)

    if reduction == "none":
        if valid_mask is None:
            return per_token.reshape(student_logits.shape[:-1])
        return per_token.new_zeros(valid_mask.shape).masked_scatter(valid_mask, per_token)
    return _reduce_tokens(per_token, reduction, f"logit_divergence(kind={kind!r})")


def lm_loss(logits: Tensor, labels: Tensor, *, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Token cross-entropy ``-log softmax(logits)[label]`` in float32 (float64 for float64 logits).

    Args:
        logits: (..., V) any float dtype.
        labels: (...) integer, already aligned with ``logits`` (``labels[t]`` is the target of
            ``logits[t]``; the caller shifts); ``ignore_index`` marks tokens that do not count.
        reduction: ``sum`` over the counted tokens, or ``mean`` (ValueError when none counts).

    Returns: float32 (float64) scalar.
    """
    _check_reduction(reduction, ("mean", "sum"))
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of logits {tuple(logits.shape)} without "
            "the vocabulary dimension (labels already aligned with logits)"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1)
    counted = flat_labels != ignore_index
    targets = flat_labels[counted]  # (N,)
    if targets.numel() > 0:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"labels must lie in [0, V = {vocab}) or equal ignore_index = {ignore_index}; "
                f"got values in [{low}, {high}]"
            )
    rows = logits.reshape(-1, vocab)[counted].to(accumulation_dtype(logits))  # (N, V)
    per_token = torch.nn.functional.cross_entropy(rows, targets, reduction="none")  # (N,)
    return _reduce_tokens(per_token, reduction, "lm_loss")


# --- Baselines for the feature term: linear CKA, and a learned projector with MSE ------------------------


def _paired_rows(
    teacher_hidden: Tensor, student_hidden: Tensor, valid_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Check (..., d_T) / (..., d_S) / (...) inputs and return the valid rows (N, d_T), (N, d_S)."""
    _check_paired_shapes(teacher_hidden, student_hidden)
    _check_valid_mask(valid_mask, teacher_hidden.shape[:-1], "the hidden states")
    return _valid_rows(teacher_hidden.detach(), valid_mask), _valid_rows(student_hidden, valid_mask)


def cka_loss(
    teacher_hidden: Tensor, student_hidden: Tensor, valid_mask: Tensor | None = None, *, eps: float = 1e-6
) -> Tensor:
    """``1 - linear CKA`` between the valid rows of the student and teacher hidden states.

    With X (N, d_S) student rows and Y (N, d_T) teacher rows, both centred over the rows::

        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)  =  <K, L>_F / (||K||_F ||L||_F),  K = X X^T, L = Y Y^T

    The d x d (feature) or N x N (Gram) form is chosen by which costs fewer multiply-adds. X and Y are
    first divided by their (detached) largest |entry|: CKA is scale invariant, so value and gradient are
    unchanged, and no product can overflow float32 on large activations.

    Args:
        teacher_hidden: (..., d_T) any float dtype; detached.
        student_hidden: (..., d_S) any float dtype; the gradient flows here.
        valid_mask: (...) bool rows to use; None uses every row.
        eps: floor of each normalised norm in the denominator: a constant input gives CKA = 0 (loss 1).

    Returns: float32 (float64 for float64 student) scalar in [0, 1].
    Raises: ValueError for shapes that disagree, a bad mask, or fewer than 2 valid rows.
    """
    teacher_rows, student_rows = _paired_rows(teacher_hidden, student_hidden, valid_mask)
    num_rows = student_rows.shape[0]
    if num_rows < 2:
        raise ValueError(f"cka_loss needs at least 2 valid rows (tokens) to centre over; got {num_rows}")
    acc = accumulation_dtype(student_hidden)
    x, y = student_rows.to(acc), teacher_rows.to(acc)  # (N, d_S), (N, d_T)
    x, y = x - x.mean(0), y - y.mean(0)
    x = x / x.detach().abs().amax().clamp_min(torch.finfo(acc).tiny)
    y = y / y.detach().abs().amax().clamp_min(torch.finfo(acc).tiny)
    d_s, d_t = x.shape[1], y.shape[1]
    if num_rows * num_rows * (d_s + d_t) < num_rows * (d_s * d_t + d_s * d_s + d_t * d_t):
        gram_x, gram_y = x @ x.T, y @ y.T  # (N, N) each
        cross = (gram_x * gram_y).sum()
    else:
        gram_x, gram_y = x.T @ x, y.T @ y  # (d_S, d_S), (d_T, d_T)
        cross = (y.T @ x).square().sum()
    # sqrt(max(., eps^2)): the gradient of sqrt never sees 0 for a constant input.
    norm_x = gram_x.square().sum().clamp_min(eps * eps).sqrt()
    norm_y = gram_y.square().sum().clamp_min(eps * eps).sqrt()
    return 1.0 - cross / (norm_x * norm_y)


class Projector(torch.nn.Module):
    """``Linear(d_student -> d_teacher)`` of the projector baseline; its parameters belong to the student
    engine and are saved with it. Init is ``torch.nn.Linear``'s default: weight and bias uniform in
    (-1/sqrt(d_student), 1/sqrt(d_student)). Input (..., d_student), cast to the weight dtype; output
    (..., d_teacher)."""

    def __init__(self, d_student: int, d_teacher: int, bias: bool = True) -> None:
        super().__init__()
        if d_student < 1:
            raise ValueError(f"d_student must be >= 1; got {d_student}")
        if d_teacher < 1:
            raise ValueError(f"d_teacher must be >= 1; got {d_teacher}")
        self.d_student, self.d_teacher = d_student, d_teacher
        self.linear = torch.nn.Linear(d_student, d_teacher, bias=bias)

    def forward(self, student_hidden: Tensor) -> Tensor:
        return self.linear(student_hidden.to(self.linear.weight.dtype))


def projector_mse_loss(
    projector: Projector,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    valid_mask: Tensor | None = None,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Projector baseline: per valid token, ``mean_j (proj(s)_j - t_j)^2`` over the d_T teacher units.

    Args:
        projector: maps (N, d_S) -> (N, d_T); trained with the student.
        student_hidden: (..., d_S); the gradient flows here and into the projector.
        teacher_hidden: (..., d_T); detached.
        valid_mask: (...) bool tokens to use; None uses every token.
        reduction: ``sum`` over valid tokens, or ``mean`` (ValueError when there is none).

    Returns: float32 (float64 when the projection is float64) scalar; squares and sums in that dtype.
    """
    _check_reduction(reduction, ("mean", "sum"))
    teacher_rows, student_rows = _paired_rows(teacher_hidden, student_hidden, valid_mask)
    widths = (student_rows.shape[1], teacher_rows.shape[1])
    if widths != (projector.d_student, projector.d_teacher):
        raise ValueError(
            f"projector maps d_student={projector.d_student} -> d_teacher={projector.d_teacher}, but "
            f"student_hidden has d_S={widths[0]} and teacher_hidden d_T={widths[1]}"
        )
    projected = projector(student_rows)  # (N, d_T), only the valid rows are projected
    return _reduce_tokens(_mse_per_token(projected, teacher_rows), reduction, "projector_mse_loss")


def projector_mse_loss_from_projected(
    projected_hidden: Tensor,
    teacher_hidden: Tensor,
    valid_mask: Tensor | None = None,
    *,
    reduction: str = "mean",
) -> Tensor:
    """``projector_mse_loss`` when the projection already ran, e.g. inside the student engine's forward (under
    ZeRO-3 the projector's parameters are only gathered there). ``projected_hidden`` (..., d_T) gets the
    gradient; ``teacher_hidden`` (..., d_T) is detached; same reductions and errors."""
    _check_reduction(reduction, ("mean", "sum"))
    if projected_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"projected_hidden {tuple(projected_hidden.shape)} must have the shape of teacher_hidden "
            f"{tuple(teacher_hidden.shape)}"
        )
    teacher_rows, projected_rows = _paired_rows(teacher_hidden, projected_hidden, valid_mask)
    return _reduce_tokens(_mse_per_token(projected_rows, teacher_rows), reduction, "projector_mse_loss")


def _mse_per_token(projected_rows: Tensor, teacher_rows: Tensor) -> Tensor:
    """(N, d_T), (N, d_T) -> (N,) mean over units of the squared difference, in the accumulation dtype."""
    acc = accumulation_dtype(projected_rows)
    return (projected_rows.to(acc) - teacher_rows.to(acc)).square().mean(-1)
