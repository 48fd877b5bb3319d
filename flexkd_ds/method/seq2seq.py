"""Flex-KD for encoder-decoder summarisers (``task: seq2seq``, the paper's section 4.3), pure tensor functions.

Two layers are distilled, each with its own selection and correlation term: the last encoder layer (rows:
the source tokens) and the last decoder layer (rows: the target tokens, the LM head's input). Importance is
the function tangent of ``F = sum_t sum_v log p_v(t)`` over the target tokens (appendix D's summed
log-probabilities): at the decoder's last layer in closed form through the LM head (by autograd on the head
here), at the encoder's last layer by back-propagating that gradient through the decoder (cross-attention).
Both come from one pass: the decoder gradient is computed once and reused for the encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LAYERS = ("encoder", "decoder")


def seq2seq_tangent_scores(
    encoder_hidden: Tensor,
    decode: Callable[[Tensor], Tensor],
    head_weight: Tensor,
    head_bias: Tensor | None,
    encoder_mask: Tensor,
    target_mask: Tensor,
    layers: tuple[str, ...] = LAYERS,
) -> dict[str, Tensor]:
    """Per-example mean ``|dF/dh|`` at each of ``layers`` -> {layer: (B, d)} (float32; float64 input stays).

    Args:
        encoder_hidden: (B, S, d) the teacher's last encoder layer.
        decode: ``(B, S, d) encoder states -> (B, T, d)`` the decoder's last layer (the LM head's input), with
            the batch's decoder inputs and masks bound.
        head_weight, head_bias: (V, d), (V,) or None: the LM head (BART adds ``final_logits_bias``).
        encoder_mask: (B, S) bool source tokens; target_mask: (B, T) bool target tokens (labels != -100).
        layers: which of ``LAYERS`` to score.
    """
    unknown = [layer for layer in layers if layer not in LAYERS]
    if unknown or not layers:
        raise ValueError(f"layers must be a non-empty subset of {LAYERS}; got {layers}")
    acc = torch.float64 if encoder_hidden.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        enc = encoder_hidden.detach().to(acc).requires_grad_("encoder" in layers)
        decoded = decode(enc).to(acc)  # (B, T, d)
        dec = decoded.detach().requires_grad_(True)
        logits = dec @ head_weight.detach().to(acc).T
        if head_bias is not None:
            logits = logits + head_bias.detach().to(acc).reshape(-1)
        value = (torch.log_softmax(logits, dim=-1) * target_mask[..., None].to(acc)).sum()
        (grad_dec,) = torch.autograd.grad(value, dec)  # (B, T, d)
        out = {}
        if "decoder" in layers:
            out["decoder"] = _row_mean(grad_dec.abs(), target_mask)
        if "encoder" in layers:
            (grad_enc,) = torch.autograd.grad(decoded, enc, grad_outputs=grad_dec)  # through the decoder
            out["encoder"] = _row_mean(grad_enc.abs(), encoder_mask)
    return out


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T, d) -> (B, d) mean over the rows where ``mask`` (B, T) is True (zeros for an empty example)."""
    weights = mask.to(values.dtype)[..., None]
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1.0)
