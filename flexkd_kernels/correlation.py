"""Fused Flex-KD correlation moments: gather of the selected teacher columns + batch-centred moments.

Four layers (Liger-Kernel style): the ``@triton.jit`` kernels, the ``correlation_moments_forward`` /
``correlation_moments_backward`` launchers, ``CorrelationMomentsFunction`` and the thin public
``correlation_moments_triton``, a drop-in for ``flexkd_ds.method.losses.correlation_moments`` (same (6, d_S)
moments, same row order ``MOMENT_NAMES``). The loss itself stays in torch: ``correlation_from_moments`` and,
for ``correlation_scope: global``, ``combine_moments`` work on d_S-sized tensors only.

What the kernel saves over the eager reference: the reference builds ``teacher[valid][:, unit_indices]``
as an (N, d_S) float32 copy, its centred version and the centred student, and reads them again in
backward. Here the forward reads only the selected teacher columns (straight from ``teacher_hidden`` in
its own layout and dtype) and the student once, the backward reads them once more and writes the student
gradient once; nothing of size (N, d_S) is ever materialised apart from that gradient.

Layouts: rank-2 (N, d) and rank-3 (B, T, d) inputs are addressed through their strides (sliced, transposed
or expanded views are fine). Higher ranks are viewed as (-1, T, d) when their strides allow it, otherwise
copied with ``.reshape`` (one extra read + write of that tensor).

On CPU the kernels run under the Triton interpreter: set ``TRITON_INTERPRET=1`` before this module is
imported (``INTERPRETED`` records whether it was).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from flexkd_ds.method.losses import check_correlation_inputs, combine_moments

# True when the kernels were built for the Triton interpreter (CPU tensors); read at import, as triton does.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# GPU defaults, measured on an H200 (bench/gpu_tune.py, docs/benchmarks.md; N 8192, d_T 4096, d_S 2048, bf16):
# 32 x 64 tiles, 4 warps took 0.29 ms forward + 0.13 ms backward, the fastest of the 36 points swept, against
# 0.41 + 0.16 ms for the first guess (16 x 128, chosen from offline ptxas register counts: ~166 registers, no
# spills). 8 programs per SM in the grid smooth the wave tail (twice that was no faster).
# Bigger tiles make the CPU interpreter faster (fewer Python-level steps).
_GPU_BLOCK_ROWS, _GPU_BLOCK_COLS, _GPU_NUM_WARPS, _GPU_PROGRAMS_PER_SM = 32, 64, 4, 8
_CPU_BLOCK_ROWS, _CPU_BLOCK_COLS = 64, 64


@triton.jit
def _correlation_moments_fwd_kernel(
    teacher_ptr,  # (B, T, d_T) via strides, fp32/fp16/bf16
    student_ptr,  # (B, T, d_S) via strides
    unit_ptr,  # (d_S,) int32/int64: teacher column of student column m
    row_valid_ptr,  # (B*T,) int8, 1 for rows in the moments (unused when ALL_ROWS)
    partial_ptr,  # (num_splits, 6, d_S) fp32 out, contiguous
    total_rows,  # B * T
    d_student,
    seq_len,  # T (1 for rank-2 inputs)
    t_stride_b,
    t_stride_t,
    t_stride_d,
    s_stride_b,
    s_stride_t,
    s_stride_d,
    rows_per_split,
    ALL_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (column block j, row split k) owns columns [j*BLOCK_D, (j+1)*BLOCK_D) and flat rows
    # [k*rows_per_split, (k+1)*rows_per_split), and writes the moments (n, mean_t, mean_s, M2_t, M2_s, C_ts)
    # of the valid rows of that block to partial[k, :, columns]. The rows come as a mask, not as a list of
    # valid row ids: listing them (nonzero) would make the host wait for the device on every call. Masked
    # rows read nothing from memory.
    #
    # Per tile of BLOCK_R rows (held in registers) the two-pass moments are exact in fp32:
    #   mean_x = sum(x) / n_b,  M2_x = sum((x - mean_x)^2),  C = sum((t - mean_t)(s - mean_s)).
    # Tiles merge into the running moments with Chan et al.'s pairwise formula (n = n_a + n_b):
    #   delta_x = mean_b - mean_a
    #   mean    = mean_a + delta_x * n_b / n
    #   M2_x    = M2_a + M2_b + delta_x^2 * n_a n_b / n
    #   C       = C_a  + C_b  + delta_t delta_s * n_a n_b / n
    # Nothing ever forms sum(x^2) - sum(x)^2 / n, which cancels catastrophically in fp32 when a column has
    # |mean| in the hundreds and std below one (massive activations). A tile without a valid row (n_b = 0)
    # has zero sums and merges as nothing: frac_b = 0 and weight = 0 leave the running moments as they are.
    pid_d = tl.program_id(0)
    pid_split = tl.program_id(1)

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d_student
    units = tl.load(unit_ptr + cols, mask=col_mask, other=0).to(tl.int64)
    t_col_off = units * t_stride_d  # (BLOCK_D,) int64: the gather of the selected teacher columns
    s_col_off = cols.to(tl.int64) * s_stride_d

    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, total_rows)

    n_run = tl.zeros((BLOCK_D,), dtype=tl.float32)
    mean_t = tl.zeros((BLOCK_D,), dtype=tl.float32)
    mean_s = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m2_t = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m2_s = tl.zeros((BLOCK_D,), dtype=tl.float32)
    c_ts = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for tile_start in range(row_start, row_end, BLOCK_R):
        rows = tile_start + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        if ALL_ROWS:
            valid = row_mask
        else:
            valid = tl.load(row_valid_ptr + rows, mask=row_mask, other=0) != 0
        # int64 before any multiply: B * T * d elements may exceed 2^31.
        flat = rows.to(tl.int64)
        b = flat // seq_len
        p = flat - b * seq_len
        t_row_off = b * t_stride_b + p * t_stride_t  # (BLOCK_R,) int64
        s_row_off = b * s_stride_b + p * s_stride_t
        mask = valid[:, None] & col_mask[None, :]
        t = tl.load(teacher_ptr + t_row_off[:, None] + t_col_off[None, :], mask=mask, other=0.0)
        s = tl.load(student_ptr + s_row_off[:, None] + s_col_off[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        s = s.to(tl.float32)

        # Tile moments (masked rows loaded as 0 and left out of the centred sums).
        n_b = tl.sum(valid.to(tl.float32), axis=0)
        mean_tb = tl.sum(t, axis=0) / tl.maximum(n_b, 1.0)
        mean_sb = tl.sum(s, axis=0) / tl.maximum(n_b, 1.0)
        tc = tl.where(mask, t - mean_tb[None, :], 0.0)
        sc = tl.where(mask, s - mean_sb[None, :], 0.0)
        m2_tb = tl.sum(tc * tc, axis=0)
        m2_sb = tl.sum(sc * sc, axis=0)
        c_b = tl.sum(tc * sc, axis=0)

        # Chan merge of (running) a and (tile) b.
        n_new = n_run + n_b
        delta_t = mean_tb - mean_t
        delta_s = mean_sb - mean_s
        frac_b = n_b / tl.maximum(n_new, 1.0)  # 0 for a tile without valid rows
        weight = n_run * frac_b  # n_a n_b / n
        mean_t += delta_t * frac_b
        mean_s += delta_s * frac_b
        m2_t += m2_tb + delta_t * delta_t * weight
        m2_s += m2_sb + delta_s * delta_s * weight
        c_ts += c_b + delta_t * delta_s * weight
        n_run = n_new

    out = partial_ptr + pid_split.to(tl.int64) * 6 * d_student + cols
    tl.store(out + 0 * d_student, n_run, mask=col_mask)
    tl.store(out + 1 * d_student, mean_t, mask=col_mask)
    tl.store(out + 2 * d_student, mean_s, mask=col_mask)
    tl.store(out + 3 * d_student, m2_t, mask=col_mask)
    tl.store(out + 4 * d_student, m2_s, mask=col_mask)
    tl.store(out + 5 * d_student, c_ts, mask=col_mask)


@triton.jit
def _correlation_moments_bwd_kernel(
    teacher_ptr,  # (B, T, d_T) via strides
    student_ptr,  # (B, T, d_S) via strides
    grad_ptr,  # (B, T, d_S) via strides, student dtype: d(out)/d(student)
    unit_ptr,  # (d_S,)
    row_valid_ptr,  # (B*T,) int8, 1 for rows in the moments (unused when ALL_ROWS)
    coef_ptr,  # (5, d_S) fp32: g_mean_s / n, 2 g_m2_s, g_c_ts, mean_s, mean_t
    total_rows,  # B * T
    d_student,
    seq_len,
    t_stride_b,
    t_stride_t,
    t_stride_d,
    s_stride_b,
    s_stride_t,
    s_stride_d,
    g_stride_b,
    g_stride_t,
    g_stride_d,
    rows_per_split,
    ALL_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Only mean_s, M2_s and C_ts depend on the student (count, mean_t, M2_t are teacher-only and get no
    # gradient). For a valid row i of column m, over the n valid rows:
    #   d mean_s / d s_i = 1 / n
    #   d M2_s   / d s_i = 2 (s_i - mean_s) - (2 / n) sum_j (s_j - mean_s) = 2 (s_i - mean_s)
    #   d C_ts   / d s_i = (t_i - mean_t)   - (1 / n) sum_j (s_j ... )    = (t_i - mean_t)
    # (centred sums vanish), so with g_* the incoming gradients of the moments:
    #   grad_s_i = g_mean_s / n + 2 g_m2_s (s_i - mean_s) + g_c_ts (t_i - mean_t);  0 for masked rows.
    # Centred form on purpose: folding the means into one constant would cancel in fp32 for
    # massive-activation teacher columns. Every gradient element is written exactly once (no zero-fill pass).
    pid_d = tl.program_id(0)
    pid_split = tl.program_id(1)

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d_student
    units = tl.load(unit_ptr + cols, mask=col_mask, other=0).to(tl.int64)
    t_col_off = units * t_stride_d
    cols64 = cols.to(tl.int64)
    s_col_off = cols64 * s_stride_d
    g_col_off = cols64 * g_stride_d

    k_mean = tl.load(coef_ptr + 0 * d_student + cols, mask=col_mask, other=0.0)
    k_m2 = tl.load(coef_ptr + 1 * d_student + cols, mask=col_mask, other=0.0)
    k_c = tl.load(coef_ptr + 2 * d_student + cols, mask=col_mask, other=0.0)
    mean_s = tl.load(coef_ptr + 3 * d_student + cols, mask=col_mask, other=0.0)
    mean_t = tl.load(coef_ptr + 4 * d_student + cols, mask=col_mask, other=0.0)

    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, total_rows)
    for tile_start in range(row_start, row_end, BLOCK_R):
        rows = tile_start + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        if ALL_ROWS:
            valid = row_mask
        else:
            valid = tl.load(row_valid_ptr + rows, mask=row_mask, other=0) != 0
        flat = rows.to(tl.int64)
        b = flat // seq_len
        p = flat - b * seq_len
        load_mask = valid[:, None] & col_mask[None, :]  # masked rows read nothing
        t_off = (b * t_stride_b + p * t_stride_t)[:, None] + t_col_off[None, :]
        s_off = (b * s_stride_b + p * s_stride_t)[:, None] + s_col_off[None, :]
        t = tl.load(teacher_ptr + t_off, mask=load_mask, other=0.0).to(tl.float32)
        s = tl.load(student_ptr + s_off, mask=load_mask, other=0.0).to(tl.float32)
        grad = k_mean[None, :] + k_m2[None, :] * (s - mean_s[None, :]) + k_c[None, :] * (t - mean_t[None, :])
        grad = tl.where(load_mask, grad, 0.0)
        g_off = (b * g_stride_b + p * g_stride_t)[:, None] + g_col_off[None, :]
        store_mask = row_mask[:, None] & col_mask[None, :]
        tl.store(grad_ptr + g_off, grad.to(grad_ptr.dtype.element_ty), mask=store_mask)


def _rows_view(hidden: Tensor) -> tuple[Tensor, int, tuple[int, int, int]]:
    """(..., d) -> (tensor to address, T, (stride_b, stride_t, stride_d)) with flat row id = b * T + p.

    Rank 2 is (N, 1, d); rank 3 is used as is; higher ranks are viewed as (-1, T, d), or copied when their
    strides do not allow a view.
    """
    if hidden.dim() == 2:
        return hidden, 1, (hidden.stride(0), 0, hidden.stride(1))
    if hidden.dim() > 3:
        shape = (-1, hidden.shape[-2], hidden.shape[-1])
        try:
            hidden = hidden.view(shape)
        except RuntimeError:
            hidden = hidden.reshape(shape)
    return hidden, hidden.shape[1], tuple(hidden.stride())


def _launch_config(device: torch.device) -> tuple[int, int, int]:
    if device.type == "cuda":
        return _GPU_BLOCK_ROWS, _GPU_BLOCK_COLS, _GPU_NUM_WARPS
    return _CPU_BLOCK_ROWS, _CPU_BLOCK_COLS, 4


def _num_splits(num_rows: int, num_col_blocks: int, block_rows: int, device: torch.device) -> int:
    """Row splits per column block: enough programs to fill a GPU, 2 on CPU, at least one tile each."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(_GPU_PROGRAMS_PER_SM * sms, num_col_blocks)
    else:
        wanted = 2
    return max(1, min(wanted, triton.cdiv(num_rows, block_rows)))


def row_valid_bytes(valid_mask: Tensor | None) -> Tensor | None:
    """(...) bool mask -> (numel,) int8 flat row mask for the kernels (a view when the mask is contiguous);
    None (every row) stays None. Nothing here reads the mask on the host."""
    if valid_mask is None:
        return None
    return valid_mask.reshape(-1).to(torch.bool).view(torch.int8)


def correlation_moments_forward(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    row_valid: Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> Tensor:
    """Launch the forward kernel; returns the merged moments (6, d_S) fp32 (no autograd).

    ``row_valid`` (B*T,) int8 marks the rows of ``teacher_hidden.shape[:-1]`` (flattened) to use
    (``row_valid_bytes``); None uses every row. No valid row gives zeros (count 0). ``num_splits`` and the
    block sizes override the heuristics (tests use them to force several tiles and splits).
    """
    d_student = student_hidden.shape[-1]
    total_rows = student_hidden.shape[:-1].numel()
    if total_rows == 0:  # reference semantics: zeros everywhere, count 0
        return torch.zeros(6, d_student, dtype=torch.float32, device=student_hidden.device)
    default_rows, default_cols, num_warps = _launch_config(student_hidden.device)
    block_rows, block_cols = block_rows or default_rows, block_cols or default_cols
    teacher, seq_len, t_strides = _rows_view(teacher_hidden)
    student, _, s_strides = _rows_view(student_hidden)
    col_blocks = triton.cdiv(d_student, block_cols)
    if num_splits is None:
        num_splits = _num_splits(total_rows, col_blocks, block_rows, student.device)
    rows_per_split = triton.cdiv(total_rows, num_splits)
    partial = torch.empty(num_splits, 6, d_student, dtype=torch.float32, device=student.device)
    all_rows = row_valid is None
    _correlation_moments_fwd_kernel[(col_blocks, num_splits)](
        teacher, student, unit_indices, unit_indices if all_rows else row_valid, partial,
        total_rows, d_student, seq_len, *t_strides, *s_strides, rows_per_split,
        ALL_ROWS=all_rows, BLOCK_R=block_rows, BLOCK_D=block_cols, num_warps=num_warps,
    )  # fmt: skip
    if num_splits == 1:
        return partial[0]
    # Splits cover disjoint row ranges: the exact Chan merge in torch is (num_splits, 6, d_S)-sized work,
    # deterministic (no atomics).
    return combine_moments(partial)


def correlation_moments_backward(
    grad_moments: Tensor,
    moments: Tensor,
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    row_valid: Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> Tensor:
    """Launch the backward kernel; returns d(out)/d(student_hidden) in the student's dtype and layout
    (``row_valid`` as in ``correlation_moments_forward``; masked rows get a zero gradient)."""
    grad_student = torch.empty_like(student_hidden)  # keeps the student's strides when dense
    if grad_student.dim() > 3:
        try:
            grad_student.view(-1, *grad_student.shape[-2:])
        except RuntimeError:
            grad_student = torch.empty(
                student_hidden.shape, dtype=student_hidden.dtype, device=student_hidden.device
            )
    total_rows = student_hidden.shape[:-1].numel()
    if total_rows == 0:
        return grad_student
    grad_moments = grad_moments.to(torch.float32)
    count = moments[0].clamp_min(1.0)
    coef = torch.stack(
        [grad_moments[2] / count, 2.0 * grad_moments[4], grad_moments[5], moments[2], moments[1]]
    ).contiguous()  # (5, d_S)
    default_rows, default_cols, num_warps = _launch_config(student_hidden.device)
    block_rows, block_cols = block_rows or default_rows, block_cols or default_cols
    teacher, seq_len, t_strides = _rows_view(teacher_hidden)
    student, _, s_strides = _rows_view(student_hidden)
    grad_rows, _, g_strides = _rows_view(grad_student)
    all_rows = row_valid is None
    d_student = student.shape[-1]
    col_blocks = triton.cdiv(d_student, block_cols)
    if num_splits is None:
        num_splits = _num_splits(total_rows, col_blocks, block_rows, student.device)
    rows_per_split = triton.cdiv(total_rows, num_splits)
    _correlation_moments_bwd_kernel[(col_blocks, num_splits)](
        teacher, student, grad_rows, unit_indices, unit_indices if all_rows else row_valid, coef,
        total_rows, d_student, seq_len, *t_strides, *s_strides, *g_strides, rows_per_split,
        ALL_ROWS=all_rows, BLOCK_R=block_rows, BLOCK_D=block_cols, num_warps=num_warps,
    )  # fmt: skip
    return grad_student


class CorrelationMomentsFunction(torch.autograd.Function):
    """moments (6, d_S) fp32 of the valid rows; differentiable w.r.t. ``student_hidden`` only.

    The teacher is frozen: it is saved by reference (no gathered copy) and gets no gradient. Gradients
    arriving for count / mean_t / M2_t are ignored (they do not depend on the student).
    """

    @staticmethod
    def forward(ctx, teacher_hidden, student_hidden, unit_indices, row_valid, launch_options=None):
        options = dict(launch_options or {})
        moments = correlation_moments_forward(
            teacher_hidden, student_hidden, unit_indices, row_valid, **options
        )
        ctx.save_for_backward(teacher_hidden, student_hidden, unit_indices, row_valid, moments)
        ctx.launch_options = options
        return moments

    @staticmethod
    def backward(ctx, grad_moments):
        teacher_hidden, student_hidden, unit_indices, row_valid, moments = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[1]:
            grad_student = correlation_moments_backward(
                grad_moments, moments, teacher_hidden, student_hidden, unit_indices, row_valid,
                **ctx.launch_options,
            )  # fmt: skip
        return None, grad_student, None, None, None


def correlation_moments_triton(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
    *,
    validate: bool = True,
    **launch_options,
) -> Tensor:
    """Fused drop-in for ``flexkd_ds.method.losses.correlation_moments``: (6, d_S) fp32 moments over the valid rows.

    Args:
        teacher_hidden: (..., d_T) fp32/fp16/bf16, any strides; read only at ``unit_indices``; no gradient.
        student_hidden: (..., d_S) fp32/fp16/bf16; its gradient comes from the backward kernel.
        unit_indices: (d_S,) int32/int64 teacher unit of each student unit.
        valid_mask: (...) bool rows to use; None uses every row. No valid row gives zeros (count 0).
        validate: run ``check_correlation_inputs`` (out-of-range indices would read out of bounds); callers
            that already checked pass False.
        launch_options: ``num_splits``, ``block_rows``, ``block_cols`` overrides (tests, tuning).

    Raises:
        ValueError: what ``check_correlation_inputs`` refuses, a dtype outside fp32/fp16/bf16, or tensors on
            different devices.
    """
    if validate:
        check_correlation_inputs(teacher_hidden, student_hidden, unit_indices, valid_mask)
    for name, tensor in (("teacher_hidden", teacher_hidden), ("student_hidden", student_hidden)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"the Triton correlation kernel takes float32/float16/bfloat16 {name}; got {tensor.dtype} "
                "(use impl='torch' for other dtypes)"
            )
    devices = {teacher_hidden.device, student_hidden.device, unit_indices.device}
    if valid_mask is not None:
        devices.add(valid_mask.device)
    if len(devices) != 1:
        raise ValueError(f"all correlation inputs must be on one device; got {sorted(map(str, devices))}")
    return CorrelationMomentsFunction.apply(
        teacher_hidden.detach(), student_hidden, unit_indices.contiguous(), row_valid_bytes(valid_mask),
        launch_options,
    )  # fmt: skip
