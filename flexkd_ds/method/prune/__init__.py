"""Importance-guided structured pruning: a narrower, shallower student cut out of the teacher (Minitron).

Flex-KD ranks the units of the teacher's LM-head input and keeps ``units`` (d_S,) in rank order. In a pre-norm
transformer those coordinates are the residual stream's at every layer, so student unit m starts as teacher
unit ``units[m]`` (file order, not sorted) in the embeddings, every read and write of the residual, the norms
and the LM head. OPT with ``word_embed_proj_dim != hidden_size`` is the exception: the units index the
projected width, so only ``embed_tokens``, ``lm_head``, ``project_in`` (input) and ``project_out`` (output)
are sliced and the residual keeps ``hidden_size``. The rest is ranked on calibration batches of the full
teacher (``collect_prune_statistics``), every statistic a mean over valid (mask == 1) tokens:

- depth: block importance ``1 - cos(x_in, x_out)`` of each layer; the ``num_layers`` most important are kept,
  in their original order and renumbered 0..k-1.
- MLP: magnitude ``|a|`` at the down projection's input; the top ``intermediate_size`` neurons per layer.
- heads (OPT, GPT-2): the attention width there is the residual width (head_dim = hidden / heads is fixed),
  so a residual of d_S keeps ``d_S / head_dim`` whole heads per layer: those with the largest mean L2 norm of
  their output before the output projection. LLaMA sets ``head_dim`` apart from the width and keeps all heads.
- norms: a norm's statistic runs over all d_T channels in the teacher, over d_S in the student. RMSNorm
  ``y = w x / rms(x)``: the student's ``w[units] x_S / rms(x_S)`` matches the teacher's ``y[units]`` when its
  weight is ``w[units] * rms(x_S) / rms(x)``; the scale is that ratio's token mean. LayerNorm
  ``y = w (x - mu) / sigma + b``: the weight gets the mean ``std(x_S) / std(x)`` and the bias is only sliced,
  because ``b`` is added after the normalisation and does not depend on sigma (scaling it too would move every
  output by ``(s - 1) b``). Measured on a 64-wide LayerNorm with random affine, d_S = 32: relative error of
  the student's output against the teacher's ``y[units]`` when a massive-activation channel (+20) is dropped,
  1.31 uncalibrated, 0.27 scaling w, 0.48 scaling w and b (kept: 0.28, 0.12, 0.16); on iid inputs all three
  are within 1% of each other. The mean shift ``mu - mu_S`` is left uncorrected: it varies per token.

Pure torch + transformers. The hooks read activations only, never parameters, so the statistics also come out
of a ZeRO-3 engine (partitioned parameters, full activations); ``PruneStatistics.state_tensor`` packs them for
one all-reduce. ``prune_checkpoint`` streams a safetensors checkpoint tensor by tensor.

Where each part lives (every public name is importable from this package):

- ``plan``: the family tables (``FAMILIES``: where each tensor lives, the rule that cuts it), the teacher's
  widths (``teacher_shapes``), ``PrunePlan``, ``make_plan``, and the student's config (``pruned_config``,
  ``planned_config``).
- ``statistics``: ``PruneStatistics`` and ``collect_prune_statistics``.
- ``cut``: tensor routing and slicing (``prune_tensor``), ``assemble_student``, ``prune_model`` and
  ``prune_checkpoint``.
"""

from __future__ import annotations

from flexkd_ds.method.prune.cut import assemble_student, prune_checkpoint, prune_model, prune_tensor
from flexkd_ds.method.prune.plan import (
    DROP,
    FAMILIES,
    KEEP,
    PrunePlan,
    make_plan,
    planned_config,
    pruned_config,
    teacher_shapes,
)
from flexkd_ds.method.prune.statistics import PruneStatistics, collect_prune_statistics

__all__ = [
    "DROP",
    "FAMILIES",
    "KEEP",
    "PrunePlan",
    "PruneStatistics",
    "assemble_student",
    "collect_prune_statistics",
    "make_plan",
    "planned_config",
    "prune_checkpoint",
    "prune_model",
    "prune_tensor",
    "pruned_config",
    "teacher_shapes",
]
