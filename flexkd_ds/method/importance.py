"""Function-tangent importance of teacher units, selection and the importance file (DESIGN.md 1-2).

Pure torch: tensors in, tensors out. Nothing here knows about ranks; the scoring job all-reduces the
``ImportanceAccumulator`` state tensor and loads the sum back.

Importance (closed forms, no backward through any model)
--------------------------------------------------------
``h_t`` (d_T) is the input of the LM head ``z_t = W h_t + b`` (W: (V, d_T)), ``p_t = softmax(z_t)``. Since
``d log p_{t,v} / d z_t = onehot(v) - p_t``, the chain rule through ``z = W h + b`` gives::

    sum_logprobs   F = sum_t sum_v log p_{t,v}   dF/dh_t = W^T (sum_v (onehot(v) - p_t)) = W^T (1 - V p_t)
    label_logprob  F = sum_t log p_t[y_t]        dF/dh_t = W^T (onehot(y_t) - p_t)

The bias only enters through ``p_t``. Per example ``g(x) = mean over valid t of |dF/dh_t|`` (elementwise
abs), and ``G = mean_x g(x)`` over every scored example on every rank.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

FUNCTIONALS = ("sum_logprobs", "label_logprob")
EMPTY_POLICIES = ("error", "zero")
REQUIRED_METADATA = tuple(
    "teacher layer functional num_examples num_tokens d_T d_S tail_mass dataset seed created_by".split()
)


# ---- Tangent scores ----------------------------------------------------------------------------------


def _shape(tensor: Tensor) -> str:
    return f"shape {tuple(tensor.shape)} dtype {tensor.dtype}"


def _compute_dtype(hidden: Tensor, head_weight: Tensor) -> torch.dtype:
    """float64 when either input is float64 (references, tests); float32 for every other float dtype."""
    return torch.float64 if torch.float64 in (hidden.dtype, head_weight.dtype) else torch.float32


def _check_tangent_inputs(
    hidden: Tensor,
    head_weight: Tensor,
    valid_mask: Tensor,
    functional: str,
    labels: Tensor | None,
    head_bias: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the bad argument; shared by the closed form and the autograd path."""
    if functional not in FUNCTIONALS:
        raise ValueError(f"functional must be one of {FUNCTIONALS}; got {functional!r}")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a (B, T, d_T) float tensor (LM-head input); got {_shape(hidden)}")
    batch, seq, d_teacher = hidden.shape
    if head_weight.dim() != 2 or not head_weight.is_floating_point() or head_weight.shape[1] != d_teacher:
        raise ValueError(
            f"head_weight must be a (V, d_T = {d_teacher}) float tensor; got {_shape(head_weight)}"
        )
    vocab = head_weight.shape[0]
    if vocab < 1:
        raise ValueError("head_weight has an empty vocabulary (V = 0)")
    if valid_mask.dtype != torch.bool or tuple(valid_mask.shape) != (batch, seq):
        raise ValueError(
            f"valid_mask must be a bool tensor (B, T) = {(batch, seq)}; got {_shape(valid_mask)}"
        )
    if head_bias is not None and (tuple(head_bias.shape) != (vocab,) or not head_bias.is_floating_point()):
        raise ValueError(f"head_bias must be a float tensor (V,) = ({vocab},); got {_shape(head_bias)}")
    for name, tensor in (("head_weight", head_weight), ("valid_mask", valid_mask), ("head_bias", head_bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; move it")
    if functional == "label_logprob":
        _check_labels(labels, valid_mask, vocab, hidden.device)


def _check_labels(labels: Tensor | None, valid_mask: Tensor, vocab: int, device: torch.device) -> None:
    if labels is None:
        raise ValueError("functional='label_logprob' needs labels (B, T): the token predicted at each t")
    if tuple(labels.shape) != tuple(valid_mask.shape) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be an int64 tensor of shape (B, T) = {tuple(valid_mask.shape)} (already shifted: "
            f"labels[b, t] is the token predicted at position t); got {_shape(labels)}"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {device}; move it")
    bad = valid_mask & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{b}, {t}] = {int(labels[b, t])} is at a valid position but outside [0, V = {vocab}); "
            "mask the position out in valid_mask or fix the labels"
        )


def _example_counts(valid_mask: Tensor, empty: str) -> Tensor:
    """(B,) int64 valid-token count per example; raises for empty examples under ``empty='error'``."""
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}; got {empty!r}")
    counts = valid_mask.sum(dim=1)  # (B,) int64
    if empty == "error":
        empty_rows = (counts == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(
                f"examples at batch index {empty_rows} have no valid token; drop them, or pass "
                "empty='zero' for padding examples (their rows are then all zeros)"
            )
    return counts


def tangent_scores(
    hidden: Tensor,
    head_weight: Tensor,
    valid_mask: Tensor,
    *,
    functional: str = "sum_logprobs",
    labels: Tensor | None = None,
    head_bias: Tensor | None = None,
    chunk_tokens: int = 4096,
    empty: str = "error",
) -> Tensor:
    """Per-example function-tangent scores ``g(x) = mean_t |dF/dh_t|`` by the closed forms (module doc).

    Args:
        hidden: (B, T, d_T) any float dtype, the LM-head input (teacher last hidden state, after the
            final norm: HF ``hidden_states[-1]``).
        head_weight: (V, d_T) any float dtype, the LM-head weight (under ZeRO-3: the gathered weight).
        valid_mask: (B, T) bool, the tokens that count.
        functional: ``"sum_logprobs"`` (paper App. D) or ``"label_logprob"``.
        labels: (B, T) int64, only for ``"label_logprob"``: ``labels[b, t]`` is the token predicted AT
            position t (already shifted). Positions with ``valid_mask`` False are ignored (may hold -100).
        head_bias: optional (V,) LM-head bias; it changes ``p_t`` only.
        chunk_tokens: valid tokens processed at a time (>= 1).
        empty: what an example without valid tokens does. ``"error"`` raises ``ValueError`` naming its
            batch index. ``"zero"`` gives an all-zero row: the scoring job pads its last batch with empty
            examples so every rank runs the same number of teacher forwards (ZeRO-3), and
            ``ImportanceAccumulator.update`` skips rows with zero tokens.

    Returns:
        (B, d_T) float32 (float64 when ``hidden`` or ``head_weight`` is float64), non-negative.

    Memory: logits and softmax are computed in float32 (float64 for float64 input). The head weight is
    upcast once: ``V * d_T * 4`` bytes (e.g. 2.1 GB for V = 128256, d_T = 4096) unless it is already
    float32. Beyond that, one (chunk_tokens, V) tensor (softmax computed in place) and two
    (chunk_tokens, d_T) tensors are held at a time; the (B, d_T) sums are accumulated with ``index_add_``.

    Raises:
        ValueError: bad shapes, dtypes or devices, unknown ``functional`` or ``empty``, missing or
            out-of-range labels, ``chunk_tokens < 1``, or an empty example under ``empty="error"``.
    """
    _check_tangent_inputs(hidden, head_weight, valid_mask, functional, labels, head_bias)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1; got {chunk_tokens!r}")
    counts = _example_counts(valid_mask, empty)
    batch, seq, d_teacher = hidden.shape
    vocab = head_weight.shape[0]
    acc = _compute_dtype(hidden, head_weight)

    weight = head_weight.detach().to(acc)  # (V, d_T), the documented upcast
    bias = None if head_bias is None else head_bias.detach().to(acc)  # (V,)
    flat_hidden = hidden.detach().reshape(batch * seq, d_teacher)  # (B*T, d_T), native dtype
    token_rows = valid_mask.reshape(-1).nonzero().flatten()  # (N,) int64, row-major
    example_of_token = torch.div(token_rows, max(seq, 1), rounding_mode="floor")  # (N,)
    flat_labels = None if labels is None else labels.reshape(-1)
    sums = torch.zeros(batch, d_teacher, dtype=acc, device=hidden.device)  # (B, d_T)

    with torch.no_grad():
        for start in range(0, token_rows.numel(), chunk_tokens):
            rows = token_rows[start : start + chunk_tokens]  # (n,)
            h = flat_hidden.index_select(0, rows).to(acc)  # (n, d_T)
            coef = h @ weight.T  # (n, V) logits
            if bias is not None:
                coef += bias
            # Softmax in place, so only one (n, V) tensor lives at a time.
            coef -= coef.amax(dim=1, keepdim=True)
            coef.exp_()
            coef /= coef.sum(dim=1, keepdim=True)  # p_t
            if functional == "sum_logprobs":
                coef.mul_(-float(vocab)).add_(1.0)  # 1 - V p_t
            else:
                coef.neg_()  # onehot(y_t) - p_t
                targets = flat_labels.index_select(0, rows).long()  # (n,)
                coef[torch.arange(rows.numel(), device=coef.device), targets] += 1.0
            grad = coef @ weight  # (n, d_T) = dF/dh_t
            del coef
            sums.index_add_(0, example_of_token[start : start + chunk_tokens], grad.abs_())
    return sums / counts.clamp_min(1).unsqueeze(1).to(acc)


def batch_tangent_scores(
    hidden: Tensor,
    head_weight: Tensor,
    batch: dict[str, Tensor],
    rows: Tensor,
    *,
    functional: str = "sum_logprobs",
    head_bias: Tensor | None = None,
    chunk_tokens: int = 4096,
) -> tuple[Tensor, Tensor]:
    """:func:`tangent_scores` of one collated batch (``data.collate``), as the scoring jobs call it.

    ``rows`` (B, T) bool are the tokens to score; ``"label_logprob"`` keeps only those with a label (the
    response tokens, ``batch["loss_mask"]``). Examples without a scored token give zero rows.

    Returns:
        ``(scores, rows)``: (B, d_T) scores and the (B, T) rows that were scored.
    """
    labels = None
    if functional == "label_logprob":
        rows, labels = rows & batch["loss_mask"], batch["labels"]
    scores = tangent_scores(
        hidden, head_weight, rows, functional=functional, labels=labels, head_bias=head_bias,
        chunk_tokens=chunk_tokens, empty="zero",
    )  # fmt: skip
    return scores, rows


def tangent_scores_autograd(
    hidden: Tensor,
    head_weight: Tensor,
    valid_mask: Tensor,
    *,
    functional: str = "sum_logprobs",
    labels: Tensor | None = None,
    head_bias: Tensor | None = None,
) -> Tensor:
    """The same ``g(x)`` as :func:`tangent_scores`, by autograd of F through ``log_softmax`` of the head.

    Used to cross-check the closed forms. It materialises the full (B, T, V) logits and their gradient,
    so it is for SMALL inputs only (tests). Arguments as in :func:`tangent_scores`; computed in float32
    (float64 for float64 input). Examples without valid tokens give all-zero rows.

    Returns:
        (B, d_T) float32 (float64 for float64 input).
    """
    _check_tangent_inputs(hidden, head_weight, valid_mask, functional, labels, head_bias)
    acc = _compute_dtype(hidden, head_weight)
    weight = head_weight.detach().to(acc)
    with torch.enable_grad():
        h = hidden.detach().to(acc).requires_grad_(True)  # (B, T, d_T)
        logits = h @ weight.T  # (B, T, V)
        if head_bias is not None:
            logits = logits + head_bias.detach().to(acc)
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, T, V)
        mask = valid_mask.to(acc)  # (B, T)
        if functional == "sum_logprobs":
            per_token = log_probs.sum(dim=-1)  # (B, T)
        else:
            safe_labels = torch.where(valid_mask, labels, torch.zeros_like(labels)).long()
            per_token = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
        total = (per_token * mask).sum()
        (grad,) = torch.autograd.grad(total, h)  # (B, T, d_T)
    counts = mask.sum(dim=1).clamp_min(1.0).unsqueeze(1)  # (B, 1)
    return (grad.abs() * mask.unsqueeze(-1)).sum(dim=1) / counts


# ---- Aggregation over batches and ranks --------------------------------------------------------------


class ImportanceAccumulator:
    """Exact running mean of per-example scores over batches and data-parallel ranks.

    State: a float64 sum (d_T,) of the counted rows, and the counts of examples, tokens and skipped
    (empty, zero-token) rows. ``state_tensor()`` packs it as one float64 tensor (d_T + 3,) whose
    elementwise SUM over ranks is the state of the union, so one all-reduce merges every rank exactly
    (counts are exact in float64 up to 2^53). The state lives on the CPU; move the packed tensor to the
    collective's device for the all-reduce and back with ``load_state_tensor``.
    """

    def __init__(self, d_teacher: int) -> None:
        if isinstance(d_teacher, bool) or not isinstance(d_teacher, int) or d_teacher < 1:
            raise ValueError(f"d_teacher must be an int >= 1; got {d_teacher!r}")
        self.d_teacher = d_teacher
        self._state = torch.zeros(d_teacher + 3, dtype=torch.float64)  # [sum..., examples, tokens, skipped]

    def update(self, per_example_scores: Tensor, num_tokens: Tensor) -> None:
        """Add the rows of ``per_example_scores`` (B, d_T) whose ``num_tokens`` (B,) int is > 0.

        Rows with ``num_tokens == 0`` (padding examples, see ``tangent_scores(empty="zero")``) are
        skipped and counted in ``num_skipped``. Raises ``ValueError`` on bad shapes, negative counts, or
        a non-finite counted row (a NaN would poison G silently).
        """
        d, batch = self.d_teacher, per_example_scores.shape[0]
        if per_example_scores.dim() != 2 or per_example_scores.shape[1] != d:
            raise ValueError(f"per_example_scores must be (B, d_T = {d}); got {_shape(per_example_scores)}")
        if num_tokens.dtype.is_floating_point or num_tokens.dtype == torch.bool or num_tokens.dim() != 1:
            raise ValueError(f"num_tokens must be a 1-D int tensor (B,); got {_shape(num_tokens)}")
        if num_tokens.shape[0] != batch:
            raise ValueError(f"num_tokens has {num_tokens.shape[0]} entries for {batch} score rows")
        num_tokens = num_tokens.detach().to("cpu", torch.int64)
        if bool((num_tokens < 0).any()):
            raise ValueError(f"num_tokens must be >= 0; got {num_tokens.tolist()}")
        counted = num_tokens > 0  # (B,)
        rows = per_example_scores.detach().to("cpu", torch.float64)[counted]  # (B_counted, d_T)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("per_example_scores has a non-finite value in a counted row; check the teacher")
        self._state[:d] += rows.sum(dim=0)
        self._state[d:] += torch.tensor([int(counted.sum()), int(num_tokens.sum()), int((~counted).sum())])

    def state_tensor(self) -> Tensor:
        """(d_T + 3,) float64 CPU copy ``[sum_0..sum_{d_T-1}, num_examples, num_tokens, num_skipped]``."""
        return self._state.clone()

    def load_state_tensor(self, state: Tensor) -> None:
        """Replace the state with ``state`` (d_T + 3,), typically the all-reduced sum of every rank's."""
        if state.dim() != 1 or state.shape[0] != self.d_teacher + 3:
            raise ValueError(
                f"state must have shape (d_T + 3,) = ({self.d_teacher + 3},); got {_shape(state)}"
            )
        state = state.detach().to("cpu", torch.float64)
        counts = state[self.d_teacher :]
        if not bool(torch.isfinite(state).all() & (counts >= 0).all() & (counts == counts.round()).all()):
            raise ValueError(f"state has non-finite values or invalid counts {counts.tolist()}")
        self._state = state.clone()

    @classmethod
    def from_state_tensor(cls, state: Tensor) -> ImportanceAccumulator:
        """A new accumulator holding ``state`` (d_T + 3,); d_T is inferred from its length."""
        if state.dim() != 1 or state.shape[0] < 4:
            raise ValueError(f"state must be a 1-D tensor of length d_T + 3 >= 4; got {tuple(state.shape)}")
        accumulator = cls(state.shape[0] - 3)
        accumulator.load_state_tensor(state)
        return accumulator

    @property
    def num_examples(self) -> int:
        return int(self._state[self.d_teacher])

    @property
    def num_tokens(self) -> int:
        return int(self._state[self.d_teacher + 1])

    @property
    def num_skipped(self) -> int:
        return int(self._state[self.d_teacher + 2])

    def scores(self) -> Tensor:
        """G (d_T,) float32: the mean of the counted rows. ``ValueError`` if no example was counted."""
        if self.num_examples == 0:
            raise ValueError(f"no example with valid tokens was accumulated ({self.num_skipped} skipped)")
        return (self._state[: self.d_teacher] / self.num_examples).to(torch.float32)


def aggregate_scores(per_example_scores: Tensor) -> Tensor:
    """(N, d_T) -> (d_T,) float32 mean over rows (float64 accumulation). ``ValueError`` on zero rows."""
    if per_example_scores.dim() != 2:
        raise ValueError(f"per_example_scores must have shape (N, d_T); got {_shape(per_example_scores)}")
    if per_example_scores.shape[0] == 0:
        raise ValueError("per_example_scores has no rows; there is nothing to average")
    return per_example_scores.detach().to(torch.float64).mean(dim=0).to(torch.float32)


# ---- Selection ---------------------------------------------------------------------------------------


def _check_scores_1d(scores: Tensor) -> None:
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor (d_T,); got {_shape(scores)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contains NaN or inf; recompute the importance")


def select_units(scores: Tensor, k: int) -> Tensor:
    """Indices (k,) int64 of the k highest ``scores`` (d_T,), highest first; ties go to the LOWER index.

    Uses a stable descending sort (``torch.topk`` makes no promise about ties), so the selection is
    reproducible across devices and runs. ``ValueError`` when k is not in [1, d_T], scores is not 1-D
    float, or scores has NaN/inf.
    """
    _check_scores_1d(scores)
    d_teacher = scores.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_teacher:
        raise ValueError(f"k must be an int in [1, d_T = {d_teacher}]; got {k!r}")
    order = torch.sort(scores.detach(), descending=True, stable=True).indices  # (d_T,)
    return order[:k].to(torch.int64)


def tail_mass(scores: Tensor, k: int) -> float:
    """Share of the total score outside the top-k: ``sum(G outside top-k) / sum(G)``, in [0, 1].

    ``ValueError`` when scores has a negative entry or sums to <= 0 (and as in :func:`select_units`).
    """
    _check_scores_1d(scores)
    values = scores.detach().to(torch.float64)
    if bool((values < 0).any()):
        raise ValueError("scores must be non-negative for tail_mass (importance scores are means of |grad|)")
    total = float(values.sum())
    if total <= 0:
        raise ValueError(f"scores must have a positive sum for tail_mass; got {total}")
    top = float(values[select_units(scores, k)].sum())
    return max(0.0, (total - top) / total)


def selection_overlap(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> float:
    """``|set(a) & set(b)| / k`` for two selections of the same size k (> 0) without duplicates."""
    list_a = [int(i) for i in (a.flatten().tolist() if isinstance(a, Tensor) else a)]
    list_b = [int(i) for i in (b.flatten().tolist() if isinstance(b, Tensor) else b)]
    if len(list_a) != len(list_b):
        raise ValueError(f"selections must have the same size; got {len(list_a)} and {len(list_b)}")
    if not list_a:
        raise ValueError("selections are empty (k = 0); overlap is undefined")
    if len(set(list_a)) != len(list_a) or len(set(list_b)) != len(list_b):
        raise ValueError("a selection contains duplicate indices")
    return len(set(list_a) & set(list_b)) / len(list_a)


# ---- The importance file (DESIGN.md "Artifacts") -----------------------------------------------------


@dataclass(frozen=True)
class ImportanceFile:
    """A loaded ``importance.safetensors``.

    Attributes:
        scores: (d_T,) float32, G.
        indices: (d_S,) int64, the selected teacher units in rank order.
        metadata: every safetensors metadata entry (strings), including ``REQUIRED_METADATA``.
        path: where it was read from (used in error messages); None when built in memory.
    """

    scores: Tensor
    indices: Tensor
    metadata: dict[str, str]
    path: str | None = None

    def check_matches(
        self, *, teacher: str, d_teacher: int, d_student: int, functional: str | None = None
    ) -> None:
        """Raise ``ValueError`` naming the file and every field that differs from this run.

        ``teacher`` is compared as an exact string, so pass the same identifier the scoring job wrote
        (e.g. the resolved model path or hub name). ``functional=None`` skips that field.
        """
        found = {
            "teacher": self.metadata.get("teacher"),
            "d_T": int(self.scores.shape[0]),
            "d_S": int(self.indices.shape[0]),
            "functional": self.metadata.get("functional"),
        }
        wanted = {"teacher": teacher, "d_T": d_teacher, "d_S": d_student, "functional": functional}
        bad = [name for name, value in wanted.items() if value is not None and found[name] != value]
        if not bad:
            return
        where = self.path if self.path is not None else "(in memory)"
        had = ", ".join(f"{name}={found[name]!r}" for name in bad)
        needs = ", ".join(f"{name}={wanted[name]!r}" for name in bad)
        raise ValueError(
            f"importance file {where} was computed for {had} but this run has {needs} "
            f"(mismatching: {', '.join(bad)}); set importance.recompute=true to score this pair (the new file goes "
            "to this run's output_dir; this one is left as it is), or point importance.path at a file made for it"
        )


def save_importance(
    path: str | os.PathLike[str], scores: Tensor, indices: Tensor, metadata: Mapping[str, object]
) -> None:
    """Write ``scores`` (d_T,) float32 and ``indices`` (d_S,) int64 with string ``metadata``, atomically.

    Every value of ``metadata`` is stored as ``str(value)``. ``d_T`` and ``d_S`` are filled from the
    tensors and ``created_by`` from ``flexkd_ds.__version__`` when absent; the other ``REQUIRED_METADATA``
    keys must be given. The bytes go to a temporary file in the target directory, are fsynced and then
    ``os.replace``d over ``path``, so readers never see a partial file and a failed write leaves none.

    Raises:
        ValueError: missing metadata keys (all named), ``d_T``/``d_S`` that disagree with the tensors, a
            non-1-D or non-finite ``scores``, or ``indices`` out of range / duplicated / longer than d_T.
    """
    from safetensors.torch import save as safetensors_bytes

    from flexkd_ds import __version__

    _check_scores_1d(scores)
    d_teacher = scores.shape[0]
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D int tensor (d_S,); got {_shape(indices)}")
    unit_indices = indices.detach().to("cpu", torch.int64).contiguous()
    d_student = unit_indices.shape[0]
    in_range = bool(((unit_indices >= 0) & (unit_indices < d_teacher)).all())
    if not in_range or torch.unique(unit_indices).numel() != d_student:
        raise ValueError(f"indices must be distinct units in [0, d_T = {d_teacher}); got {unit_indices}")

    meta = {str(key): str(value) for key, value in metadata.items()}
    for key, value in (("d_T", d_teacher), ("d_S", d_student)):
        if meta.setdefault(key, str(value)) != str(value):
            raise ValueError(f"metadata {key} = {meta[key]!r} but the tensors give {key} = {value}")
    meta.setdefault("created_by", f"flexkd_ds {__version__}")
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise ValueError(f"importance metadata is missing required keys {missing}; pass them in metadata")

    tensors = {"scores": scores.detach().to("cpu", torch.float32).contiguous(), "indices": unit_indices}
    payload = safetensors_bytes(tensors, metadata=meta)
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {target.parent} for the importance file {target} does not exist")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; others on the cluster must read the artifact
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def load_importance(path: str | os.PathLike[str]) -> ImportanceFile:
    """Read an importance file written by :func:`save_importance`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a safetensors file, or lacking the ``scores``/``indices`` tensors, a required
            metadata key, or with shapes/dtypes that disagree with the contract. The message names ``path``.
    """
    from safetensors import safe_open

    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"importance file {target} does not exist")
    try:
        with safe_open(str(target), framework="pt") as handle:
            names = set(handle.keys())
            meta = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in ("scores", "indices") if name in names}
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"importance file {target} is not a readable safetensors file: {error}") from error
    missing_tensors = [name for name in ("scores", "indices") if name not in tensors]
    if missing_tensors:
        raise ValueError(f"importance file {target} lacks the tensors {missing_tensors}; recompute it")
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise ValueError(f"importance file {target} lacks the metadata keys {missing}; recompute it")
    scores, indices = tensors["scores"], tensors["indices"]
    if (scores.dim(), scores.dtype, indices.dim(), indices.dtype) != (1, torch.float32, 1, torch.int64):
        raise ValueError(
            f"importance file {target} must hold scores (d_T,) float32 and indices (d_S,) int64; got "
            f"{_shape(scores)} and {_shape(indices)}"
        )
    if meta["d_T"] != str(scores.shape[0]) or meta["d_S"] != str(indices.shape[0]):
        raise ValueError(
            f"importance file {target} metadata d_T={meta['d_T']}, d_S={meta['d_S']} disagree with its "
            f"tensors ({scores.shape[0]}, {indices.shape[0]}); recompute it"
        )
    return ImportanceFile(scores=scores, indices=indices, metadata=meta, path=str(target))


def importance_file_hash(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of the file bytes (recorded in checkpoints to detect a changed selection)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
