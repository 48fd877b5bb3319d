"""Flex-KD for sequence classifiers (``task: classification``), as pure tensor functions.

The feature of an example is the final hidden layer at the position the classifier reads: the first token
([CLS]) for encoders (BERT, RoBERTa), the last attended token for decoders (GPT-2, LLaMA, OPT), whose
``ForSequenceClassification`` heads score that position. One row per example: the correlation loss of
``losses`` is then taken over the examples of the batch (``correlation_scope: global`` centres over all
ranks' examples, the paper's batch of 8 / 16).

Importance (the paper's appendix D, classification): the gradient of the summed log-probabilities of the
classes, ``F(x) = sum_c log p_c(x)``, with respect to the feature h, ``g = mean_x |dF/dh|``. Through a
linear head ``z = W h + b`` it has the closed form ``dF/dh = W^T (1 - C p)``; through BERT's pooler
(dense + tanh) it is taken by autograd. For a regression head (one output, STS-B) there are no class
probabilities: ``F(x) = y(x)``, the predicted score itself, so ``g`` measures how much the prediction moves
with each unit, the same function-tangent idea with the output as the function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

POOLINGS = ("first", "last")


def pooled_rows(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(B, T, d) final hidden states -> (B, d) at the position the classifier reads: ``first`` = token 0,
    ``last`` = the last attended token of each right-padded row."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if pooling == "first":
        return hidden[:, 0]
    last = attention_mask.long().sum(1).clamp_min(1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def classifier_tangent_scores(features: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    """(B, d) per-example ``|dF/dh|`` with ``F = sum_c log softmax(head(h))_c`` (C > 1 outputs) or
    ``F = head(h)`` (one output: regression). ``head`` maps (B, d) -> (B, C) row by row. float32 (float64
    for float64 input)."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        h = features.detach().to(acc).requires_grad_(True)
        outputs = head(h).to(acc)  # (B, C)
        if outputs.dim() != 2:
            raise ValueError(f"the classifier head must return (B, C); got {tuple(outputs.shape)}")
        if outputs.shape[1] == 1:
            value = outputs.sum()
        else:
            value = torch.log_softmax(outputs, dim=-1).sum()
        (grad,) = torch.autograd.grad(value, h)
    return grad.abs()


def regression_loss_sum(predictions: Tensor, targets: Tensor) -> Tensor:
    """Sum over examples of the squared error of a one-output head (B, 1) against (B,) scores, float32."""
    return (predictions.reshape(-1).float() - targets.reshape(-1).float()).square().sum()
