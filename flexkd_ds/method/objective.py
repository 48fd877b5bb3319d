"""The training objective ``L = alpha * L_feature + beta * L_logit + lambda * L_sup`` and its normalisation.

One rule for every term, so the update does not depend on how the global batch is split into micro-batches
and ranks (DESIGN.md "Engines"):

- *token terms* (logit divergence, LM loss) are sums over valid tokens divided by the all-reduced
  valid-token count of the whole global batch (all micro-batches of the step, all ranks); the projector MSE
  is a sum over the feature rows (``feature_mask``) divided by the all-reduced count of those rows
  (``global_feature_rows``), so its weight does not move with the prompt / response mix of a batch;
- *batch terms* (the Flex-KD correlation and CKA) are statistics of a set of rows, not sums over tokens.
  They are taken per micro-batch (over the rows of all ranks with ``correlation_scope: global``, else per
  rank) and averaged over the micro-batches of the step (and over ranks for local scope).

DeepSpeed's ``engine.backward`` divides the loss by the accumulation steps and averages gradients over
data-parallel ranks. ``MicroObjective.loss_for_backward`` multiplies that back (``grad_accum * world``),
so the accumulated gradient is exactly the gradient of the step objective above.

Pure torch: collectives arrive as an ``all_reduce`` callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flexkd_ds.method import losses, ops
from flexkd_ds.method.fused_logits import FusedLogitTerms

AllReduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ObjectiveWeights:
    """What the objective computes (a view of ``config.LossConfig``)."""

    feature_loss: str = "flexkd"  # flexkd | projector | cka | none
    logit_loss: str = "rkl"  # rkl | fkl | jsd | skew_fkl | skew_rkl | tvd | none
    alpha: float = 0.05
    beta: float = 1.0
    lm_weight: float = 1.0
    temperature: float = 1.0
    skew: float = 0.1
    jsd_beta: float = 0.5
    correlation_scope: str = "local"
    correlation_eps: float = 1e-6
    impl: str = "auto"

    @classmethod
    def from_config(cls, loss_cfg) -> ObjectiveWeights:
        return cls(**{name: getattr(loss_cfg, name) for name in cls.__dataclass_fields__})

    @property
    def uses_feature(self) -> bool:
        return self.feature_loss != "none" and self.alpha > 0

    @property
    def uses_logit(self) -> bool:
        return self.logit_loss != "none" and self.beta > 0

    @property
    def uses_lm(self) -> bool:
        return self.lm_weight > 0


@dataclass
class MicroTerms:
    """One micro-batch's contribution. ``loss`` is what to hand to ``engine.backward``; the rest is for logs,
    detached scalars left on the device (reading them is a host sync): token sums (divide their all-reduced
    totals by the global token count) and batch-term values."""

    loss: Tensor
    logit_sum: Tensor
    lm_sum: Tensor
    projector_sum: Tensor
    feature_value: Tensor  # correlation or 1 - CKA of this micro-batch (already global for global scope)


def micro_objective(
    weights: ObjectiveWeights,
    *,
    student_logits: Tensor | None,  # (B, T, V), or None with fused_terms
    teacher_logits: Tensor | None,  # (B, T, V) or None when no logit term (or with fused_terms)
    student_hidden: Tensor,  # (B, T, d_S)
    teacher_hidden: Tensor | None,  # (B, T, d_T) or None when no feature term
    projected_hidden: Tensor | None,  # (B, T, d_T) projector(student_hidden) for the projector baseline
    labels: Tensor,  # (B, T) shifted targets, -100 where no loss
    feature_mask: Tensor,  # (B, T) bool rows of the feature loss
    unit_indices: Tensor | None,  # (d_S,) for flexkd
    fused_terms: FusedLogitTerms | None = None,  # the LM and logit terms, already computed chunk by chunk
    global_tokens: float,
    global_feature_rows: float
    | None = None,  # valid (label) tokens of the whole step, all micro-batches and ranks
    grad_accum: int,
    world_size: int,
    all_reduce: AllReduce | None = None,
    units_checked: bool = False,  # unit_indices passed losses.check_unit_indices once (no per-call host syncs)
) -> MicroTerms:
    """The backward-ready loss of one micro-batch on one rank, normalised by the rule in the module doc."""
    if global_tokens <= 0:
        raise ValueError("the global batch has no valid (response) token; check the data and max_length")
    scale = grad_accum * world_size  # undoes DeepSpeed's 1/grad_accum and mean over ranks
    token_terms = student_hidden.new_zeros((), dtype=torch.float32)
    zero = token_terms.detach()
    terms = MicroTerms(loss=token_terms, logit_sum=zero, lm_sum=zero, projector_sum=zero, feature_value=zero)

    # The batch (feature) term first: on a GPU its many small launches then queue behind the student's forward,
    # before the token terms' host syncs (boolean row selection, the label range check) empty the queue.
    batch_term = token_terms.new_zeros(())
    if weights.uses_feature:
        if weights.feature_loss == "projector":
            proj_sum = losses.projector_mse_loss_from_projected(
                projected_hidden, teacher_hidden, feature_mask, reduction="sum"
            )
            if not global_feature_rows:
                raise ValueError("the projector term needs global_feature_rows (all ranks' feature rows)")
            batch_term = weights.alpha * proj_sum / global_feature_rows  # a mean over all feature rows
            terms.projector_sum = proj_sum.detach()
        else:
            value, batch_weight = _batch_feature_term(
                weights,
                student_hidden,
                teacher_hidden,
                feature_mask,
                unit_indices,
                all_reduce,
                grad_accum,
                world_size,
                units_checked,
            )
            batch_term = weights.alpha * value * batch_weight
            terms.feature_value = value.detach()

    if fused_terms is not None:  # beta * logit sum + lm_weight * LM sum, with the gradient
        token_terms = token_terms + fused_terms.loss
        terms.lm_sum, terms.logit_sum = fused_terms.lm_sum, fused_terms.divergence_sum
    if weights.uses_lm and fused_terms is None:
        lm_sum = losses.lm_loss(student_logits, labels, reduction="sum")
        token_terms = token_terms + weights.lm_weight * lm_sum
        terms.lm_sum = lm_sum.detach()
    if weights.uses_logit and fused_terms is None:
        loss_mask = labels != -100
        logit_sum = losses.logit_divergence(
            student_logits,
            teacher_logits,
            loss_mask,
            kind=weights.logit_loss,
            temperature=weights.temperature,
            skew=weights.skew,
            jsd_beta=weights.jsd_beta,
            reduction="sum",
        )
        token_terms = token_terms + weights.beta * logit_sum
        terms.logit_sum = logit_sum.detach()

    terms.loss = scale * (token_terms / global_tokens + batch_term)
    return terms


def _batch_feature_term(
    weights: ObjectiveWeights,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    feature_mask: Tensor,
    unit_indices: Tensor | None,
    all_reduce: AllReduce | None,
    grad_accum: int,
    world_size: int,
    units_checked: bool = False,
) -> tuple[Tensor, float]:
    """(value, weight): the step objective holds ``weight * value`` summed over micro-batches and ranks."""
    if weights.feature_loss == "flexkd":
        is_global = weights.correlation_scope == "global"
        value = ops.correlation_loss(
            teacher_hidden,
            student_hidden,
            unit_indices,
            feature_mask,
            eps=weights.correlation_eps,
            all_reduce=all_reduce if is_global else None,
            impl=weights.impl,
            units_checked=units_checked,
            check_rows=not units_checked,
        )
        if is_global:
            # Same value on every rank and each rank back-propagates its own rows' share. DeepSpeed averages
            # over ranks and ``scale`` has undone that, so the update is the SUM of the shares: the full
            # gradient of the global-batch loss. Averaged over micro-batches only.
            return value, 1.0 / grad_accum
        return value, 1.0 / (grad_accum * world_size)  # mean over micro-batches and ranks
    if weights.feature_loss == "cka":
        return losses.cka_loss(teacher_hidden, student_hidden, feature_mask), 1.0 / (grad_accum * world_size)
    raise ValueError(f"unknown batch feature loss {weights.feature_loss!r}")
