"""The logit and LM terms computed from the hidden states and the LM heads, chunk by chunk over tokens.

At LLM vocabulary sizes the logits dominate a distillation step: ``losses.logit_divergence`` and
``losses.lm_loss`` take (N, V) logits, and with autograd each kind keeps several (N, V) float32 tensors for
backward. At 4 x 2048 tokens and V = 128k one such tensor is 4 GiB. Here the logits exist one chunk of rows at
a time:

    for each chunk of c rows:
        z_S = h_S W_S^T (+ b_S),  z_T = h_T W_T^T (+ b_T)                       (c, V) each
        value  += beta * sum_rows D(p_T || p_S) + lm_weight * sum_rows CE(z_S, y)
        dz      = d value / d z_S                                               (c, V), autograd on the chunk
        dh_S[chunk] = dz W_S;  dW_S += dz^T h_S;  db_S += sum_rows dz

so the gradients of the student's hidden rows and head are complete when the forward returns, and backward
only scales them by the incoming gradient. The per-chunk math is ``losses._divergence_per_token`` and
``cross_entropy`` on the chunk's float32 logits, exactly what the unfused path computes on all rows at once,
so both paths share one definition of every kind (0 log 0, -inf teacher logits, temperature without T^2).

Precision follows the unfused path: the matmuls run in the weights' dtype (bf16 in a bf16 run), the logits
are upcast to float32 (float64 for float64 inputs) before the softmax, and ``dz`` is cast back to the weight
dtype for the two backward matmuls. The head gradient is accumulated over chunks in float32.

The teacher side never needs a gradient: ``teacher_hidden`` and ``teacher_head_weight`` are read only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flexkd_ds.method import losses

# On a GPU one chunk's (c, V) float32 logits hold at most this many elements (256 MiB), and a chunk has at most
# GPU_MAX_CHUNK_ROWS rows: about ten such tensors live while a chunk is processed (student and teacher logits,
# log-softmaxes, probabilities, their gradients). Measured on an H200 (bench/gpu_tune.py, docs/benchmarks.md;
# N 8192, d_S 2048, d_T 4096, bf16, rkl + LM, forward + backward): at V = 50272, chunks of 256 rows (the
# earlier 2^24 budget) took 75.6 ms against 41.5 ms for whole logits, 1024 rows 42.6 ms with 2308 MiB peak
# extra against 11168 MiB; at V = 32000, 1024 rows 27.1 ms / 1469 MiB against 26.0 ms / 7093 MiB, while
# 2048 rows (0.96x the time) held 0.40 of the whole-logit memory.
CHUNK_ELEMENTS = 1 << 26
GPU_MAX_CHUNK_ROWS = 1024
# On the CPU a chunk's (c, V) float32 tensor stays under 28 MiB: glibc serves a block above its mmap
# threshold (adaptive, but never above 32 MiB on 64-bit Linux) with a fresh mapping, so every temporary of a
# bigger chunk is page-faulted in and zeroed by the kernel on each use. At V = 49152 and 172 rows in one chunk
# that was 120k page faults and a quarter of the loss's time (bench/step_attribution.py, docs/benchmarks.md).
CPU_CHUNK_ELEMENTS = 7 << 20


class FusedLogitTerms(NamedTuple):
    """``loss`` = beta * divergence_sum + lm_weight * lm_sum carries the gradient; the sums are detached
    float32 (float64) scalars on the device, for logs (read them at logging steps: ``float()`` syncs)."""

    loss: Tensor
    divergence_sum: Tensor
    lm_sum: Tensor


def default_chunk_rows(vocab: int, device_type: str = "cuda") -> int:
    """Rows per chunk: a power of two with chunk x V <= ``CHUNK_ELEMENTS`` (``CPU_CHUNK_ELEMENTS`` for
    ``device_type="cpu"``), at least 16 and at most ``GPU_MAX_CHUNK_ROWS`` (4096 on the CPU)."""
    budget = CPU_CHUNK_ELEMENTS if device_type == "cpu" else CHUNK_ELEMENTS
    most = 4096 if device_type == "cpu" else GPU_MAX_CHUNK_ROWS
    rows = max(1, budget // max(vocab, 1))
    return int(min(most, max(16, 1 << (rows.bit_length() - 1))))


def fused_linear_divergence(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    kind: str = "rkl",
    temperature: float = 1.0,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
    beta: float = 1.0,
    lm_weight: float = 0.0,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    check_labels: bool = True,
) -> FusedLogitTerms:
    """``beta * logit_divergence(z_S, z_T, mask, reduction="sum") + lm_weight * lm_loss(z_S, labels,
    reduction="sum")`` with ``z = hidden @ head_weight.T (+ bias)``, without ever holding (N, V) logits.

    Args:
        student_hidden: (..., d_S) the student's LM-head input at the rows that matter; gradient flows here.
        student_head_weight: (V, d_S) the student's LM head (gradient flows here when it requires grad).
        teacher_hidden: (..., d_T) the teacher's LM-head input at the same rows, or None for the LM term only.
        teacher_head_weight: (V, d_T) the teacher's LM head (read only), with ``teacher_hidden``.
        mask: (...) bool rows of the divergence; None = every row.
        labels: (...) int targets already aligned with the rows, ``ignore_index`` where the LM term does
            not count; None = no LM term.
        kind, temperature, skew, jsd_beta: as ``losses.logit_divergence``.
        beta, lm_weight: the weights of the two sums in ``loss``; 0 turns a term off (it is not computed).
        student_head_bias, teacher_head_bias: (V,) optional head biases.
        chunk_rows: rows per chunk; None = ``default_chunk_rows(V, device type)``.
        check_labels: check that the counted labels lie in [0, V) (a host sync; the trainer checks its data
            once and passes False).

    Returns: ``FusedLogitTerms`` (loss with gradient, and the two detached sums).
    """
    vocab, d_student = _check_head(student_head_weight, student_hidden, "student")
    divergence_on = beta > 0 and teacher_hidden is not None
    if teacher_hidden is not None or teacher_head_weight is not None:
        if teacher_hidden is None or teacher_head_weight is None:
            raise ValueError("teacher_hidden and teacher_head_weight come together (or both None)")
        t_vocab, _ = _check_head(teacher_head_weight, teacher_hidden, "teacher")
        if t_vocab != vocab:
            raise ValueError(
                f"vocabulary sizes differ: student head V={vocab}, teacher head V={t_vocab}; logit "
                "distillation needs the same vocabulary"
            )
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                f"{tuple(student_hidden.shape)} must have the same rows (all dimensions but the last)"
            )
    if divergence_on:
        if kind not in losses.LOGIT_DIVERGENCES:
            raise ValueError(f"kind must be one of {losses.LOGIT_DIVERGENCES}; got {kind!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not (0.0 <= skew <= 1.0 and 0.0 <= jsd_beta <= 1.0):
            raise ValueError(f"skew and jsd_beta must lie in [0, 1]; got {skew}, {jsd_beta}")
    losses._check_valid_mask(mask, student_hidden.shape[:-1], "student_hidden")
    lm_on = lm_weight > 0 and labels is not None
    if labels is not None:
        if labels.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the rows of student_hidden {tuple(student_hidden.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
        if check_labels and lm_on:
            counted = labels[labels != ignore_index]
            if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
                raise ValueError(
                    f"labels must lie in [0, V = {vocab}) or equal ignore_index = {ignore_index}; got values "
                    f"in [{int(counted.min())}, {int(counted.max())}]"
                )
    for bias, weight, who in ((student_head_bias, student_head_weight, "student"),
                              (teacher_head_bias, teacher_head_weight, "teacher")):  # fmt: skip
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{who}_head_bias must have shape (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}"
            )

    rows = student_hidden.shape[:-1].numel()
    flat = {
        "student_hidden": student_hidden.reshape(rows, d_student),
        "teacher_hidden": teacher_hidden.reshape(rows, teacher_hidden.shape[-1]) if divergence_on else None,
        "mask": (mask.reshape(rows) if mask is not None else None) if divergence_on else None,
        "labels": labels.reshape(rows) if lm_on else None,
    }
    settings = {
        "kind": kind, "temperature": temperature, "skew": skew, "jsd_beta": jsd_beta,
        "beta": beta if divergence_on else 0.0, "lm_weight": lm_weight if lm_on else 0.0,
        "ignore_index": ignore_index, "chunk_rows": chunk_rows or default_chunk_rows(vocab, student_hidden.device.type),
        "grads": torch.is_grad_enabled(),  # validation under no_grad computes values only
    }  # fmt: skip
    loss, divergence_sum, lm_sum = _FusedLinearDivergence.apply(
        flat["student_hidden"],
        student_head_weight,
        student_head_bias,
        flat["teacher_hidden"],
        teacher_head_weight if divergence_on else None,
        teacher_head_bias if divergence_on else None,
        flat["mask"],
        flat["labels"],
        settings,
    )
    return FusedLogitTerms(loss, divergence_sum, lm_sum)


def _check_head(weight: Tensor, hidden: Tensor, who: str) -> tuple[int, int]:
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{who}_head_weight must be (V, d) with d the last dimension of {who}_hidden; got "
            f"{tuple(weight.shape)} and {tuple(hidden.shape)}"
        )
    return weight.shape[0], weight.shape[1]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(c, d) rows -> (c, V) logits in the weight's dtype, as ``nn.Linear`` computes them."""
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)


class _FusedLinearDivergence(torch.autograd.Function):
    """Value and gradients in one pass over the chunks; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, labels, settings):
        acc = losses.accumulation_dtype(s_hidden)
        rows = s_hidden.shape[0]
        beta, lm_weight = settings["beta"], settings["lm_weight"]
        grads = settings["grads"]
        need_weight_grad = grads and ctx.needs_input_grad[1]
        need_bias_grad = grads and s_bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(s_hidden) if grads and ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if need_weight_grad else None
        )
        # addmm_ into grad_weight: no (V, d) temporary per chunk (the cast path keeps bf16 sums in float32)
        in_place = grad_weight is not None and grad_weight.dtype == s_weight.dtype
        temperature = settings["temperature"]
        grad_bias = torch.zeros(s_bias.shape, dtype=acc, device=s_bias.device) if need_bias_grad else None
        sums = torch.zeros(2, dtype=acc, device=s_hidden.device)  # divergence, lm
        step = settings["chunk_rows"]
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            h = s_hidden[start:stop]
            with torch.enable_grad():
                z = _logits(h, s_weight.detach(), None if s_bias is None else s_bias.detach())
                z = z.detach().to(acc).requires_grad_(True)  # (c, V) float32: the unfused path's upcast
                total = z.new_zeros(())
                if beta > 0:
                    t_z = _logits(t_hidden[start:stop], t_weight, t_bias).detach().to(acc)
                    keep = mask[start:stop] if mask is not None else None
                    z_rows, t_rows = (z, t_z) if keep is None else (z[keep], t_z[keep])
                    if temperature != 1.0:  # z / 1 would be two more (c, V) passes and temporaries
                        z_rows, t_rows = z_rows / temperature, t_rows / temperature
                    log_q = torch.log_softmax(z_rows, dim=-1)
                    log_p = torch.log_softmax(t_rows, dim=-1)
                    per_token = losses._divergence_per_token(
                        log_p, log_q, settings["kind"], settings["skew"], settings["jsd_beta"]
                    )
                    value = per_token.sum()
                    sums[0] += value.detach()
                    total = total + beta * value
                if lm_weight > 0:
                    ce = torch.nn.functional.cross_entropy(  # no boolean indexing: no host sync
                        z, labels[start:stop], ignore_index=settings["ignore_index"], reduction="sum"
                    )
                    sums[1] += ce.detach()
                    total = total + lm_weight * ce
                if not (grad_hidden is not None or need_weight_grad or need_bias_grad):
                    continue
                (dz,) = torch.autograd.grad(total, z) if total.requires_grad else (torch.zeros_like(z),)
            dz_w = dz.to(s_weight.dtype)  # the unfused path's backward casts the logits' gradient back too
            if grad_hidden is not None:
                grad_hidden[start:stop] = (dz_w @ s_weight).to(grad_hidden.dtype)
            if need_weight_grad and in_place:
                grad_weight.addmm_(dz_w.T, h.to(s_weight.dtype))
            elif need_weight_grad:
                grad_weight += (dz_w.T @ h.to(s_weight.dtype)).to(acc)
            if need_bias_grad:
                grad_bias += dz.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (s_weight.dtype, None if s_bias is None else s_bias.dtype)
        loss = beta * sums[0] + lm_weight * sums[1]
        divergence_sum, lm_sum = sums[0].clone(), sums[1].clone()
        ctx.mark_non_differentiable(divergence_sum, lm_sum)
        return loss, divergence_sum, lm_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_divergence, _grad_lm):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_loss
        # Scaled in place: the stored gradients are this function's own and serve one backward (a second
        # backward through the same graph is refused by autograd's version check, not silently wrong).
        out_hidden = None if grad_hidden is None else grad_hidden.mul_(scale.to(grad_hidden.dtype))
        out_weight = None if grad_weight is None else grad_weight.mul_(scale).to(weight_dtype)
        out_bias = None if grad_bias is None else grad_bias.mul_(scale).to(bias_dtype)
        return out_hidden, out_weight, out_bias, None, None, None, None, None, None
