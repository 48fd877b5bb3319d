"""The distill job for ``task: classification`` (launch/distill.py dispatches here): a sequence classifier
(``AutoModelForSequenceClassification``, encoder or decoder) distilled into a narrower one with

    L = alpha * L_feature + beta * KL(p_T || p_S) over the classes + lambda * CE(labels)     (MSE for regression)

on the same engines as the causal-LM job: the teacher as a ZeRO-3 (or replicated) inference engine, the
student's DeepSpeed engine, the importance pass over all ranks, one normalisation rule (the example terms
are sums over the examples of the step divided by the all-reduced example count), complete-or-unused
checkpoints, resume, preemption, a Hugging Face export that loads with ``AutoModelForSequenceClassification``,
and the task's metric on the validation set at the end (``eval.json``).

Features are one row per example (``method.classification.pooled_rows``): the final hidden layer at [CLS]
for encoders, at the last attended token for decoders. The paper's classification runs use beta = 0 (no
logit term); a regression task (one output) has none: ``loss.beta`` must then be 0 or ``logit_loss: none``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flexkd_ds.evaluation.classification_metrics import task_metrics
from flexkd_ds.inputs import classification as cls_data
from flexkd_ds.inputs import models
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.common import HOLDOUT, ModelSpec, holdout_split, model_specs, name_student
from flexkd_ds.jobs.prune import check_prune_request, task_pruned_spec
from flexkd_ds.jobs.task_run import TaskRun
from flexkd_ds.method import importance
from flexkd_ds.method.classification import classifier_tangent_scores, pooled_rows, regression_loss_sum
from flexkd_ds.method.losses import Projector, check_unit_indices
from flexkd_ds.method.objective import ObjectiveWeights, micro_objective
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.checkpoints import consolidated_state_dict
from flexkd_ds.runtime.dist import DistEnv, all_reduce_sum, barrier
from flexkd_ds.runtime.engines import (
    build_teacher_engine,
    deepspeed_dict,
    engine_dtype,
    gathered,
    sharded_init,
)

logger = logging.getLogger("flexkd_ds")

ENCODERS = ("bert", "roberta", "distilbert", "electra")


def pooling_of(config) -> str:
    return "first" if config.model_type in ENCODERS else "last"


def classifier_head(model: nn.Module):
    """(the head's parameters, ``h (B, d) -> outputs (B, C)``): what the classifier computes from the pooled
    final hidden state, for the importance pass (read under ``gathered`` for a ZeRO-3 teacher)."""
    kind = model.config.model_type
    if kind == "bert":
        pooler, classifier = model.bert.pooler, model.classifier
        return [*pooler.parameters(), *classifier.parameters()], lambda h: classifier(
            pooler.activation(pooler.dense(h))
        )
    if kind in ("roberta", "electra"):
        return list(model.classifier.parameters()), lambda h: model.classifier(h[:, None, :])
    if hasattr(model, "score"):  # GPT-2, LLaMA, OPT, ...: a linear head on the last token
        return list(model.score.parameters()), model.score
    raise ValueError(
        f"{type(model).__name__}: no known classifier head (supported: BERT, RoBERTa, ELECTRA and decoder "
        "models with a `score` head: GPT-2, LLaMA, OPT, ...)"
    )


def load_classifier(spec: ModelSpec, num_labels: int, dtype: torch.dtype):
    """``AutoModelForSequenceClassification`` for the spec (random init from its config with the spec's seed,
    or the checkpoint), with ``num_labels`` outputs and the tokenizer's pad id (decoders pool by it)."""
    from transformers import AutoModelForSequenceClassification

    if spec.source is None:
        config = _with_labels(spec.config, num_labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForSequenceClassification.from_config(config)
        return model.to(dtype)
    model = models.load_sequence_classifier(spec.source, num_labels=num_labels, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = spec.config.pad_token_id
    return model


def _with_labels(config, num_labels: int):
    import copy

    config = copy.deepcopy(config)
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return config


def check_label_sets(teacher: ModelSpec, student: ModelSpec, num_labels: int) -> None:
    """A trained classifier's label set must be the task's, and the teacher's and student's must agree."""
    for spec, role in ((teacher, "model.teacher"), (student, "model.student")):
        if spec.source is None:
            continue
        archs = getattr(spec.config, "architectures", None) or []
        trained = any(a.endswith("ForSequenceClassification") for a in archs)
        if trained and spec.config.num_labels != num_labels:
            raise ValueError(
                f"{role} {spec.name} is a classifier with {spec.config.num_labels} labels, but the task has "
                f"{num_labels} (classify.num_labels / the data.train preset); use a {num_labels}-label checkpoint"
            )
        if role == "model.teacher" and not trained:
            logger.warning(
                "model.teacher %s is not a fine-tuned classifier (config.architectures=%s): its classifier head "
                "is random, so there is little to distil; fine-tune the teacher on the task first (the paper "
                "does)", spec.name, archs,
            )  # fmt: skip
    labels = []
    for spec in (teacher, student):
        if (
            spec.source is not None
            and getattr(spec.config, "id2label", None)
            and spec.config.num_labels == num_labels
        ):
            named = {int(k): v for k, v in spec.config.id2label.items()}
            if any(not v.startswith("LABEL_") for v in named.values()):
                labels.append(named)
    if len(labels) == 2 and labels[0] != labels[1]:
        raise ValueError(f"the teacher's labels {labels[0]} differ from the student's {labels[1]}")


class DistillClassifier(nn.Module):
    """The student's engine module: the classifier and, for the projector baseline, its projector. ``forward``
    returns (logits (B, C), pooled features (B, d_S), projected (B, d_T) or None)."""

    def __init__(self, model: nn.Module, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.projector = model, projector
        self.pooling = pooling_of(model.config)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        features = pooled_rows(out.hidden_states[-1], attention_mask, self.pooling)
        projected = self.projector(features) if self.projector is not None else None
        return out.logits, features, projected


def teacher_outputs(engine, batch, pooling: str) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True)  # fmt: skip
    return out.logits, pooled_rows(out.hidden_states[-1], batch["attention_mask"], pooling)


def load_sets(cfg: DistillConfig, tokenizer, source: cls_data.ClassificationSource):
    """(train, valid or None) datasets; ``data.valid=holdout`` takes ``data.valid_holdout`` seeded rows
    (jobs.common.holdout_split, the rule of every task)."""
    rows = cls_data.load_rows(source.train, source.train_split, source.fields, source.num_labels,
                              max_rows=cfg.data.max_train_rows, seed=cfg.seed,
                              num_generated=cfg.data.num_synthetic)  # fmt: skip
    valid_rows = None
    if source.valid == HOLDOUT:
        valid_rows, rows = holdout_split(cfg, rows, valid=True), holdout_split(cfg, rows, valid=False)
    elif source.valid == cls_data.BUILTIN_CLASSIFICATION:
        valid_rows = cls_data.generated_rows(64, cfg.seed + 7919, source.num_labels)
    elif source.valid:
        valid_rows = cls_data.load_rows(source.valid, source.valid_split, source.fields, source.num_labels)
    make = lambda r: cls_data.ClassificationDataset(r, tokenizer, cfg.data.max_length)  # noqa: E731
    return make(rows), (make(valid_rows) if valid_rows else None)


def run_classify(cfg: DistillConfig) -> Path:
    """Train, export and evaluate; returns the exported student directory."""
    from flexkd_ds.jobs.distill import keep_resolved_config, student_ds_dict

    run = TaskRun(cfg)
    env, out, weights, t = run.env, run.out, run.weights, cfg.train
    source = cls_data.resolve_source(cfg.data, cfg.classify)
    regression = source.num_labels == 1
    if regression and weights.uses_logit:
        raise ValueError(
            f"a regression task (one output, data.train={cfg.data.train}) has no class distribution to distil: "
            "set loss.beta=0 or loss.logit_loss=none"
        )
    teacher, student, tokenizer = model_specs(cfg)
    check_label_sets(teacher, student, source.num_labels)
    flexkd_on = weights.feature_loss == "flexkd" and weights.uses_feature
    pruned = cfg.model.resolved_student_init == "pruned"
    d_teacher, d_student = teacher.width, student.width
    if pruned:
        check_prune_request(cfg, teacher.config, d_student)
    if flexkd_on and d_student >= d_teacher:
        raise ValueError(f"flexkd selects d_S of the teacher's d_T units: d_S={d_student} >= d_T={d_teacher}")
    train_set, valid_set = load_sets(cfg, tokenizer, source)
    pad_id = tokenizer.pad_token_id
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        keep_resolved_config(cfg, out)
        logger.info("classification: %d training rows, %s validation rows, %d label(s), metric %s",
                    len(train_set), len(valid_set) if valid_set else 0, source.num_labels, source.metric)  # fmt: skip

    t_ds = deepspeed_dict(cfg.deepspeed.teacher_config, micro_batch_size=t.micro_batch_size, grad_accum=1,
                          world_size=env.world_size, dtype=cfg.model.dtype)  # fmt: skip
    needs_teacher = weights.uses_feature or weights.uses_logit or pruned
    t_engine = None
    if needs_teacher:
        t_engine = build_teacher_engine(lambda: load_classifier(teacher, source.num_labels, engine_dtype(t_ds)),
                                        t_ds, sharded=teacher.source is not None)  # fmt: skip
    t_pooling = pooling_of(teacher.config)

    unit_indices, importance_hash = None, None
    if flexkd_on or pruned:  # a pruned student is cut at the top-scored units, which flexkd then pairs as cut
        path = out / "importance.safetensors"
        if reusable_importance(path, cfg, teacher.name, d_teacher, d_student, "classification"):
            indices = importance.load_importance(path).indices  # this run's own scores (a rerun or resume)
            logger.info("reusing importance file %s", path)
        else:
            found = score_classifier(cfg, t_engine, train_set, env, pad_id, t_pooling, d_teacher, teacher.name,
                                     regression)  # fmt: skip
            indices = importance.select_units(found["scores"], d_student)
            found["metadata"]["tail_mass"] = f"{importance.tail_mass(found['scores'], d_student):.6f}"
            if env.is_main:
                importance.save_importance(path, found["scores"], indices, found["metadata"])
            barrier()
        if flexkd_on:
            unit_indices = indices.to(env.device)
            check_unit_indices(unit_indices, d_teacher, d_student)
        importance_hash = importance.importance_file_hash(path)
        if pruned:
            student = pruned_classifier(cfg, t_engine, teacher, tokenizer, train_set, env, pad_id, regression,
                                        importance.load_importance(path))  # fmt: skip

    s_ds = student_ds_dict(cfg, env, out)
    with sharded_init(s_ds, enabled=student.source is not None):
        s_model = load_classifier(student, source.num_labels, engine_dtype(s_ds))
        projector = None
        if weights.feature_loss == "projector":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 2)
                projector = Projector(d_student, d_teacher)
    module = DistillClassifier(s_model, projector)
    module.train()

    step = run.start_student(module, s_ds, len(train_set), importance_hash, "distill (classification)")
    s_engine = run.engine
    # the example terms: lm_loss on (1, B, C) logits is the CE sum; the divergence is over the classes
    example_weights = ObjectiveWeights(
        **{**weights.__dict__, "lm_weight": 0.0 if regression else weights.lm_weight}
    )
    try:
        while step < t.max_steps:
            batches = run.next_batches(train_set, lambda items: cls_data.collate(items, pad_id, regression))
            examples = run.agree(sum(int(b["counted"].sum()) for b in batches), step)
            if examples is None:  # preempted: checkpointed
                return out / "student"
            lr = s_engine.get_lr()[0]
            start = time.perf_counter()
            sums = torch.zeros(
                4, dtype=torch.float64, device=env.device
            )  # sup, logit, feature, micro-batches
            for batch in batches:
                batch = {k: v.to(env.device) for k, v in batch.items()}
                t_logits = t_features = None
                if t_engine is not None:
                    t_logits, t_features = teacher_outputs(t_engine, batch, t_pooling)
                s_logits, s_features, projected = s_engine(batch["input_ids"], batch["attention_mask"])
                rows = s_features.shape[0]
                labels = batch["labels"][None] if not regression else torch.zeros(1, rows, dtype=torch.long,
                                                                                   device=env.device)  # fmt: skip
                terms = micro_objective(
                    example_weights,
                    student_logits=s_logits[None].float(),
                    teacher_logits=None if t_logits is None else t_logits[None].float(),
                    student_hidden=s_features[None],
                    teacher_hidden=None if t_features is None else t_features[None],
                    projected_hidden=None if projected is None else projected[None],
                    labels=labels,
                    feature_mask=torch.ones(1, rows, dtype=torch.bool, device=env.device),
                    unit_indices=unit_indices,
                    global_tokens=examples,
                    global_feature_rows=examples,
                    grad_accum=t.grad_accum,
                    world_size=env.world_size,
                    all_reduce=all_reduce_sum,
                    units_checked=unit_indices is not None,
                )
                loss = terms.loss
                sup = terms.lm_sum
                if regression and weights.uses_lm:
                    sup = regression_loss_sum(s_logits, batch["labels"])
                    loss = loss + t.grad_accum * env.world_size * weights.lm_weight * sup / examples
                s_engine.backward(loss)
                s_engine.step()
                feature = terms.projector_sum if weights.feature_loss == "projector" else terms.feature_value
                sums += torch.stack([sup.detach().double(), terms.logit_sum.double(), feature.double(),
                                     torch.ones((), dtype=torch.float64, device=env.device)])  # fmt: skip
            totals = all_reduce_sum(sums).cpu()
            step += 1
            feature = (
                float(totals[2] / examples)
                if weights.feature_loss == "projector"
                else float(totals[2] / totals[3])
            )
            record = {"step": step, "lr": lr, "sup": float(totals[0] / examples), "logit": float(totals[1] / examples),
                      "feature": feature, "examples": int(examples), "step_s": time.perf_counter() - start}  # fmt: skip
            record["loss"] = (weights.lm_weight * record["sup"] * weights.uses_lm + weights.beta * record["logit"]
                              * weights.uses_logit + weights.alpha * feature * weights.uses_feature)  # fmt: skip
            run.log(record)
    finally:
        run.close()

    run.checkpoint(step)
    name_student(module.model.config, "student distilled", teacher.name, steps=step, output_dir=str(out))
    student_dir = export_classifier(s_engine, module, tokenizer, out, env)
    if valid_set is not None:
        result = evaluate_classifier(
            s_engine, valid_set, env, pad_id, t.micro_batch_size, source.metric, regression
        )
        if env.is_main:
            (out / "eval.json").write_text(json.dumps({"data": cfg.data.valid, "metric": source.metric,
                                                       **result}, indent=1) + "\n")  # fmt: skip
            shown = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "rows")
            logger.info("validation (%d rows): %s", result["rows"], shown)
    if env.is_main:
        logger.info(
            "done: %d steps in %.0f s; student %s", step, time.perf_counter() - run.start_time, student_dir
        )
    return student_dir


def pruned_classifier(cfg, engine, teacher: ModelSpec, tokenizer, train_set, env: DistEnv, pad_id: int,
                      regression: bool, found: importance.ImportanceFile) -> ModelSpec:  # fmt: skip
    """The student cut from the teacher classifier at the importance file's units (reused when this output_dir
    already holds the same cut): its layers, heads, MLP neurons and, for BERT, pooler outputs ranked on
    ``prune.num_examples`` training examples (``flexkd_ds.method.prune``)."""
    return task_pruned_spec(cfg, engine, teacher, tokenizer, train_set,
                            lambda items: cls_data.collate(items, pad_id, regression), ("input_ids", "attention_mask"),
                            found, env)  # fmt: skip


def reusable_importance(
    path: Path, cfg, teacher_name: str, d_teacher: int, d_student: int, task: str
) -> bool:
    """An importance file this output_dir already holds, for the same teacher, task, data and widths: a rerun or
    a resume uses it (its hash is in the checkpoints) instead of scoring again; ``importance.recompute`` scores."""
    if cfg.importance.recompute or not path.is_file():
        return False
    found = importance.load_importance(path)
    meta = found.metadata
    same = (meta.get("teacher") == teacher_name and meta.get("task") == task and meta.get("dataset") == cfg.data.train
            and found.scores.numel() == d_teacher and found.indices.numel() == d_student)  # fmt: skip
    if not same:
        raise ValueError(
            f"{path} was made for another run (teacher {meta.get('teacher')}, task {meta.get('task')}, data "
            f"{meta.get('dataset')}, d_T {found.scores.numel()}, d_S {found.indices.numel()}); use another "
            "output_dir or set importance.recompute=true"
        )
    return True


def score_classifier(cfg, engine, dataset, env: DistEnv, pad_id: int, pooling: str, d_teacher: int,
                     teacher_name: str, regression: bool) -> dict:  # fmt: skip
    """The importance pass of a classifier teacher over ``importance.num_examples`` seeded examples, summed
    over every rank (each rank scores its share; every rank runs the same number of forwards)."""
    from flexkd_ds.jobs.score import scoring_order

    order = scoring_order(cfg, len(dataset))
    batches = sampling.shard_for_scoring(len(order), env.rank, env.world_size, cfg.importance.batch_size)
    params, head = classifier_head(engine.module)
    accumulator = importance.ImportanceAccumulator(d_teacher)
    for positions in tqdm(batches, desc="importance", disable=not env.is_main, unit="batch"):
        items = [None if p is None else dataset[order[p]] for p in positions]
        batch = {k: v.to(env.device) for k, v in cls_data.collate(items, pad_id, regression).items()}
        _, features = teacher_outputs(engine, batch, pooling)
        with gathered(params):
            scores = classifier_tangent_scores(features, head)
        accumulator.update(scores, batch["counted"].long())
    state = all_reduce_sum(accumulator.state_tensor().to(env.device))
    accumulator.load_state_tensor(state)
    functional = "score_value" if regression else "sum_class_logprobs"
    metadata = {"teacher": teacher_name, "layer": f"final hidden layer ({pooling} token)", "functional": functional,
                "num_examples": str(accumulator.num_examples), "num_tokens": str(accumulator.num_tokens),
                "dataset": cfg.data.train, "seed": str(cfg.seed), "task": "classification"}  # fmt: skip
    return {"scores": accumulator.scores(), "metadata": metadata}


def export_classifier(s_engine, module: DistillClassifier, tokenizer, out: Path, env: DistEnv) -> Path:
    state = consolidated_state_dict(s_engine)
    student_dir = out / "student"
    if env.is_main:
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        module.model.save_pretrained(student_dir, state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(student_dir)
    barrier()
    return student_dir


def predictions_of(logits: Tensor, regression: bool) -> list:
    return logits.reshape(-1).float().tolist() if regression else logits.argmax(-1).tolist()


def evaluate_classifier(forward_engine, valid_set, env: DistEnv, pad_id: int, batch_size: int, metric: str,
                        regression: bool) -> dict:  # fmt: skip
    """The task metric of the student on ``valid_set``, every rank scoring its share (gathered on rank 0)."""
    from flexkd_ds.runtime.dist import all_gather_objects

    forward_engine.eval()
    mine = []
    with torch.no_grad():
        for positions in sampling.shard_for_scoring(len(valid_set), env.rank, env.world_size, batch_size):
            items = [None if p is None else valid_set[p] for p in positions]
            batch = {k: v.to(env.device) for k, v in cls_data.collate(items, pad_id, regression).items()}
            logits = forward_engine(batch["input_ids"], batch["attention_mask"])[0]
            for p, pred in zip(positions, predictions_of(logits, regression), strict=True):
                if p is not None:
                    mine.append((p, pred))
    forward_engine.train()
    pairs = sorted(x for part in (all_gather_objects(mine) if env.world_size > 1 else [mine]) for x in part)
    predictions = [pred for _, pred in pairs]
    labels = [valid_set[p]["label"] for p, _ in pairs]
    return {**task_metrics(metric, predictions, labels), "rows": len(pairs)}
