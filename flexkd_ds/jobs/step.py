"""One optimizer step of the distill job: the student module, the micro-batches, the teacher's side, the loss.

What a micro-batch does on the device, in order: the teacher forward (live ZeRO-3 / replicated engine, or
the cache), the student forward, the objective, ``engine.backward``, ``engine.step``. Nothing in it waits
for the device (DESIGN.md "Engines"): the rows the logit terms read are indexed by a tensor computed on the
host with the batch, the loss sums stay on the device until a logging step reads them, the selected units
were validated once before training, and the timers synchronise only on logging steps.

With ``loss.fused_logits`` (the default) the LM and logit terms come from ``method.fused_logits``: the
logits are formed chunk by chunk from the LM-head inputs and the heads, never as a (tokens x V) tensor. The
student's chunked loss runs inside its LM head's forward (``call_head``), where ZeRO-3 has gathered the
head; the teacher's head is held whole on every rank (the cache does the same), gathered once at start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from flexkd_ds.inputs import data
from flexkd_ds.jobs.score import feature_rows
from flexkd_ds.method.fused_logits import FusedLogitTerms, fused_linear_divergence
from flexkd_ds.method.losses import lm_loss
from flexkd_ds.method.objective import ObjectiveWeights, micro_objective
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.dist import DistEnv, all_reduce_sum
from flexkd_ds.runtime.engines import HeadInput, call_head, head_skipped


def head_is_last(model) -> bool:
    """True when the logits are the LM head's output as is (no soft-capping or scaling after it), so they
    can be formed from the base model's last hidden state at chosen rows only."""
    config = getattr(model, "config", None)
    return all(
        getattr(config, name, None) in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale")
    )


def fusable(model) -> str | None:
    """None when the chunked logit loss can stand in for this model's logits; else the reason in words."""
    if not head_is_last(model):
        return f"{type(model).__name__} transforms its logits after the LM head (soft-capping or scaling)"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"{type(model).__name__}'s LM head is a {type(head).__name__}, not a Linear layer"
    return None


def flat_rows(tensor: Tensor, rows: Tensor) -> Tensor:
    """(B, T, ...) -> (R, ...) at ``rows``: (R,) flat row-major indices (no host sync), or a (B, T) bool mask."""
    flat = tensor.reshape(-1, *tensor.shape[2:])
    if rows.dtype == torch.bool:
        return flat[rows.reshape(-1)]
    return flat.index_select(0, rows)


@dataclass
class FusedRequest:
    """What the student's LM head needs for the chunked loss (all rows are the label rows, in order)."""

    labels: Tensor  # (R,) targets
    teacher_hidden: Tensor | None  # (R, d_T) teacher LM-head inputs, None without a logit term
    teacher_head: tuple[Tensor, Tensor | None] | None  # (V, d_T) weight and (V,) bias
    weights: ObjectiveWeights

    def __call__(self, head: nn.Module, student_rows: Tensor) -> FusedLogitTerms:
        w = self.weights
        teacher_weight, teacher_bias = self.teacher_head if self.teacher_hidden is not None else (None, None)
        return fused_linear_divergence(
            student_rows, head.weight, self.teacher_hidden, teacher_weight, None, self.labels,
            kind=w.logit_loss if w.uses_logit else "fkl", temperature=w.temperature, skew=w.skew,
            jsd_beta=w.jsd_beta, beta=w.beta if w.uses_logit else 0.0, lm_weight=w.lm_weight if w.uses_lm else 0.0,
            student_head_bias=head.bias, teacher_head_bias=teacher_bias, check_labels=False,
        )  # fmt: skip


class DistillStudent(nn.Module):
    """The student's engine module: the causal LM and, for the projector baseline, its projector, so both
    are optimised, sharded and checkpointed together. ``forward`` returns (logits or fused terms, last
    hidden, projected)."""

    def __init__(self, model: nn.Module, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.projector = projector
        self._head_input = HeadInput(model)

    def forward(self, input_ids, attention_mask, logit_rows=None, fused: FusedRequest | None = None):
        """``logit_rows``: (R,) flat row-major indices or a (B, T) bool mask. The logits only at those rows,
        (1, R, V) (the only ones the LM and logit terms read: ``labels != -100``), so no (B, T, V) tensor is
        formed; the hidden state is whole. None: (B, T, V) logits. ``fused`` (with ``logit_rows``, for a
        ``fusable`` model): the ``FusedLogitTerms`` of those rows instead of logits."""
        if logit_rows is None or not head_is_last(self.model):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            hidden = self._head_input.pop()  # (B, T, d_S)
            if logit_rows is not None:
                logits = flat_rows(logits, logit_rows)[None]
        else:
            base = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = base.last_hidden_state  # the LM-head input (tests/test_trainer.py checks it is)
            head = self.model.get_output_embeddings()
            rows = flat_rows(hidden, logit_rows)
            if fused is not None:
                with call_head(head, fused):
                    logits = head(rows)  # FusedLogitTerms, computed where ZeRO-3 has gathered the head
            else:
                logits = head(rows)[None]
            self._head_input.pop()  # the hook saw the rows; the feature terms read all of hidden
        projected = self.projector(hidden) if self.projector is not None else None  # (B, T, d_T)
        return logits, hidden, projected


def micro_batch(dataset, example_ids: list[int], pad_id: int, env: DistEnv) -> dict[str, Tensor]:
    """``data.collate`` of the examples with their ``example_ids`` (B,) (the cache's keys) and ``label_rows``
    (R,) (the flat row-major positions with a label, found here on the host), moved to the device; and on
    the host: ``example_ids_host`` and ``counts_host`` (response tokens, feature rows by
    ``loss.feature_tokens``)."""
    batch = data.collate([dataset[i] for i in example_ids], pad_id)
    batch["example_ids"] = torch.tensor(example_ids, dtype=torch.long)
    batch["label_rows"] = (batch["labels"].reshape(-1) != -100).nonzero().flatten()
    counts = {
        "tokens": int(batch["loss_mask"].sum()),
        "response": int(batch["loss_mask"].sum()),
        "all": int(batch["attention_mask"].sum()),
    }  # the normalisers, known before any device work
    moved = {k: v.to(env.device) for k, v in batch.items()}
    moved["example_ids_host"], moved["counts_host"] = list(example_ids), counts
    return moved


@dataclass
class Teacher:
    """The teacher's side of a step: a live engine (with the LM-head capture) or a cache, and for the fused
    path its head (weight, bias), held whole."""

    engine: object = None
    capture: HeadInput | None = None
    cached: object = None
    head: tuple[Tensor, Tensor | None] | None = None

    def window(self, micro_batches, pad_id: int) -> list[Tensor]:
        """The live teacher's hidden states (B, T_i, d_T) of every micro-batch of a step from ONE forward
        over all of them (right-padded to the longest, so ZeRO-3 gathers the teacher once per step). Right
        padding leaves every attended position's hidden state as it is (causal attention, positions from 0)."""
        width = max(b["input_ids"].shape[1] for b in micro_batches)

        def padded(key, value):
            return torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value)
                              for b in micro_batches])  # fmt: skip

        with torch.no_grad(), head_skipped(self.engine.module):
            self.engine(input_ids=padded("input_ids", pad_id), attention_mask=padded("attention_mask", 0),
                        use_cache=False)  # fmt: skip
        hidden = self.capture.pop()
        sizes = [b["input_ids"].shape[0] for b in micro_batches]
        return [
            h[:, : b["input_ids"].shape[1]] for h, b in zip(hidden.split(sizes), micro_batches, strict=True)
        ]

    def logits_at(self, hidden: Tensor, rows: Tensor) -> Tensor:
        """(1, R, V) teacher logits from its held head at the label rows of (B, T, d_T) hidden states."""
        weight, bias = self.head
        with torch.no_grad():
            return torch.nn.functional.linear(flat_rows(hidden, rows).to(weight.dtype), weight, bias)[None]

    def __call__(self, batch, fused: bool, want_logits: bool) -> tuple[Tensor | None, Tensor | None]:
        """(logits at the label rows (1, R, V) or None, hidden (B, T, d_T) or None) for one micro-batch."""
        rows = batch["label_rows"]
        if self.engine is not None:
            with torch.no_grad():
                if fused or not want_logits:  # the hidden state is all that is read: no (B, T, V) logits
                    with head_skipped(self.engine.module):
                        self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False)  # fmt: skip
                    logits = None
                else:
                    out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False)  # fmt: skip
                    logits = flat_rows(out.logits, rows)[None]
            return logits, self.capture.pop()
        if self.cached is not None:
            ids, width = batch["example_ids_host"], batch["input_ids"].shape[1]
            if fused or not want_logits:
                return None, self.cached.hidden(ids, width)
            return self.cached(ids, width, rows=rows)
        return None, None


def train_step(
    cfg,
    weights: ObjectiveWeights,
    teacher: Teacher,
    s_engine,
    micro_batches,
    global_tokens: float,
    unit_indices,
    env: DistEnv,
    global_rows: float | None = None,
    fused: bool = False,
    timed: bool = True,
    pad_id: int | None = None,
) -> dict[str, Tensor | float]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the step's metrics as device tensors
    (``step_metrics`` turns them into numbers: a host sync, so only at logging steps). ``timed``: synchronise
    around the teacher and the student to time them (logging steps); else only the step's wall time.
    ``pad_id`` (``train.teacher_per_step``): run the live teacher once over all micro-batches (``Teacher.window``)."""
    accelerator = get_accelerator()
    teacher_s = student_s = 0.0
    sums = torch.zeros(
        5, dtype=torch.float64, device=env.device
    )  # lm, logit, projector, feature, micro-batches
    step_start = time.perf_counter()
    window = None
    if pad_id is not None and teacher.engine is not None and len(micro_batches) > 1:  # train.teacher_per_step
        start = time.perf_counter()
        window = teacher.window(micro_batches, pad_id)
        teacher_s += time.perf_counter() - start
    for index, batch in enumerate(micro_batches):
        start = time.perf_counter()
        if window is not None:
            teacher_hidden = window[index]
            teacher_logits = None
            if weights.uses_logit and not fused:
                teacher_logits = teacher.logits_at(teacher_hidden, batch["label_rows"])
        else:
            teacher_logits, teacher_hidden = teacher(batch, fused, weights.uses_logit)
        if timed:
            accelerator.synchronize()
        teacher_s += time.perf_counter() - start
        start = time.perf_counter()
        rows = batch["label_rows"]
        labels = flat_rows(batch["labels"], rows)[None]  # (1, R)
        request = None
        if fused:
            request = FusedRequest(
                labels=labels[0],
                teacher_hidden=flat_rows(teacher_hidden, rows) if weights.uses_logit else None,
                teacher_head=teacher.head,
                weights=weights,
            )
        student_out, student_hidden, projected = s_engine(
            batch["input_ids"], batch["attention_mask"], logit_rows=rows, fused=request
        )
        terms = micro_objective(
            weights,
            student_logits=None if fused else student_out,
            teacher_logits=teacher_logits,
            fused_terms=student_out if fused else None,
            student_hidden=student_hidden,
            teacher_hidden=teacher_hidden,
            projected_hidden=projected,
            labels=labels,
            feature_mask=feature_rows(batch, cfg.loss.feature_tokens),
            unit_indices=unit_indices,
            global_tokens=global_tokens,
            global_feature_rows=global_rows,
            grad_accum=cfg.train.grad_accum,
            world_size=env.world_size,
            all_reduce=all_reduce_sum,
            units_checked=unit_indices is not None,  # distill checked the fixed selection once: no host syncs here
        )
        s_engine.backward(terms.loss)
        s_engine.step()
        if timed:
            accelerator.synchronize()
        student_s += time.perf_counter() - start
        sums += torch.stack([terms.lm_sum, terms.logit_sum, terms.projector_sum, terms.feature_value,
                             torch.ones((), device=sums.device)]).to(sums)  # fmt: skip
    return {"sums": all_reduce_sum(sums), "global_tokens": global_tokens, "global_rows": global_rows,
            "teacher_s": teacher_s, "student_s": student_s, "step_s": time.perf_counter() - step_start,
            "timed": timed, "weights": weights, "s_engine": s_engine}  # fmt: skip


def step_metrics(raw: dict) -> dict:
    """The numbers of one step (same on all ranks): each term, the loss, tokens, times, gradient norm."""
    weights, global_tokens, global_rows = raw["weights"], raw["global_tokens"], raw["global_rows"]
    totals = raw["sums"].cpu()  # the host sync of a logging step
    lm, logit = (totals[:2] / global_tokens).tolist()
    feature = float(totals[3] / totals[4])
    if weights.feature_loss == "projector":
        feature = float(totals[2] / global_rows) if global_rows else 0.0  # mean over the feature rows
    loss = (
        weights.lm_weight * lm * weights.uses_lm
        + weights.beta * logit * weights.uses_logit
        + weights.alpha * feature * weights.uses_feature
    )
    elapsed = raw["teacher_s"] + raw["student_s"] if raw["timed"] else raw["step_s"]
    metrics = {"loss": loss, "lm": lm, "logit": logit, "feature": feature, "tokens": int(global_tokens),
               "tokens_per_s": global_tokens / max(elapsed, 1e-9)}  # fmt: skip
    if raw["timed"]:
        metrics.update(teacher_ms=1000 * raw["teacher_s"], student_ms=1000 * raw["student_s"])
    metrics["step_ms"] = 1000 * raw["step_s"]  # the whole optimizer step, synchronised at logging steps
    metrics["grad_norm"] = float(raw["s_engine"].get_global_grad_norm() or 0.0)
    return metrics


def validation_nll_sums(forward, valid_set, env: DistEnv, pad_id: int, batch_size: int) -> float:
    """Mean NLL per response token on the validation set of ``forward(batch) -> summed NLL`` (a device
    scalar), sharded over ranks; every rank runs the same number of forwards (padded batches), as ZeRO-3
    requires."""
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    with torch.no_grad():
        for positions in sampling.shard_for_scoring(len(valid_set), env.rank, env.world_size, batch_size):
            batch = data.collate([None if p is None else valid_set[p] for p in positions], pad_id)
            batch["label_rows"] = (batch["labels"].reshape(-1) != -100).nonzero().flatten()
            batch = {k: v.to(env.device) for k, v in batch.items()}
            totals[0] += forward(batch).to(totals)
            totals[1] += batch["loss_mask"].sum().to(totals)
    totals = all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp_min(1))


def student_nll(s_engine, weights: ObjectiveWeights, fused: bool):
    """``batch -> summed NLL`` of the student at its label rows (chunked when ``fused``)."""
    lm_only = ObjectiveWeights(feature_loss="none", logit_loss="none", lm_weight=1.0)

    def forward(batch):
        s_engine.eval()
        try:
            rows = batch["label_rows"]
            labels = flat_rows(batch["labels"], rows)
            request = FusedRequest(labels, None, None, lm_only) if fused else None
            out = s_engine(batch["input_ids"], batch["attention_mask"], logit_rows=rows, fused=request)[0]
            return out.lm_sum if fused else lm_loss(out[0], labels, reduction="sum")
        finally:
            s_engine.train()

    return forward


def teacher_nll(teacher: Teacher, fused: bool):
    """``batch -> summed NLL`` of the live teacher at the label rows (its held head, when ``fused``)."""

    def forward(batch):
        logits, hidden = teacher(batch, fused, want_logits=True)
        labels = flat_rows(batch["labels"], batch["label_rows"])
        if not fused:
            return lm_loss(logits[0], labels, reduction="sum")
        weight, bias = teacher.head
        return fused_linear_divergence(
            flat_rows(hidden, batch["label_rows"]), weight, labels=labels, lm_weight=1.0,
            student_head_bias=bias, check_labels=False,
        ).lm_sum  # fmt: skip

    return forward
