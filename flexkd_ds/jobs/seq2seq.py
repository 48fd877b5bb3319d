"""The distill job for ``task: seq2seq`` (launch/distill.py dispatches here): an encoder-decoder summariser
(``AutoModelForSeq2SeqLM``, BART) distilled into a smaller one with

    L = alpha * (L_flex(last encoder layer) + L_flex(last decoder layer)) + beta * token KL + lambda * CE

(the paper's section 4.3: two selections, two correlation terms), on the same engines, normalisation,
checkpoints, resume and export as the causal-LM job, ending with ROUGE-2 / ROUGE-L of greedy summaries of
``seq2seq.eval_rows`` validation rows (``eval.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flexkd_ds.inputs import models
from flexkd_ds.inputs import seq2seq as s2s_data
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.classify import reusable_importance
from flexkd_ds.jobs.common import HOLDOUT, ModelSpec, holdout_split, model_specs, name_student
from flexkd_ds.jobs.prune import check_prune_request, task_pruned_spec
from flexkd_ds.jobs.task_run import TaskRun
from flexkd_ds.method import importance
from flexkd_ds.method.losses import check_unit_indices
from flexkd_ds.method.objective import ObjectiveWeights, micro_objective
from flexkd_ds.method.seq2seq import LAYERS, seq2seq_tangent_scores
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


def load_seq2seq(spec: ModelSpec, dtype: torch.dtype):
    from transformers import AutoModelForSeq2SeqLM

    if spec.source is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return AutoModelForSeq2SeqLM.from_config(copy.deepcopy(spec.config)).to(dtype)
    source, kwargs = models._hf_args(spec.source, None)
    return AutoModelForSeq2SeqLM.from_pretrained(
        source.path_or_name, **kwargs, **models._loading_kwargs(dtype)
    )


def head_of(model) -> tuple[list, torch.Tensor, torch.Tensor | None]:
    """(parameters to gather, LM-head weight (V, d), bias (V,) or None: BART's ``final_logits_bias``)."""
    head = model.get_output_embeddings()
    bias = getattr(model, "final_logits_bias", None)
    return [head.weight], head.weight, bias


class DistillSeq2Seq(nn.Module):
    """The student's engine module: ``forward`` returns (logits at the label rows (1, R, V), last encoder layer
    (B, S, d_S), last decoder layer (B, T, d_S))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch_inputs: dict, label_rows):
        out = self.model(**batch_inputs, output_hidden_states=True, use_cache=False)
        vocab = out.logits.shape[-1]
        logits = out.logits.reshape(-1, vocab).index_select(0, label_rows)[None]
        return logits, out.encoder_last_hidden_state, out.decoder_hidden_states[-1]


def model_inputs(batch: dict) -> dict:
    return {
        k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    }


def load_rows(cfg: DistillConfig, source: s2s_data.Seq2SeqSource) -> tuple[list[dict], list[dict] | None]:
    """(training rows, validation rows or None); ``data.valid=holdout`` takes ``data.valid_holdout`` seeded
    rows of the training rows (jobs.common.holdout_split, the rule of every task)."""
    rows = s2s_data.load_rows(source.train, source.train_split, source.fields, max_rows=cfg.data.max_train_rows,
                              seed=cfg.seed, num_generated=cfg.data.num_synthetic)  # fmt: skip
    if source.valid == HOLDOUT:
        return holdout_split(cfg, rows, valid=False), holdout_split(cfg, rows, valid=True) or None
    if source.valid == s2s_data.BUILTIN_SEQ2SEQ:
        return rows, s2s_data.generated_rows(cfg.seq2seq.eval_rows, cfg.seed + 7919)
    if source.valid:
        return rows, s2s_data.load_rows(
            source.valid, source.valid_split, source.fields, max_rows=cfg.seq2seq.eval_rows
        )
    return rows, None


def run_seq2seq(cfg: DistillConfig) -> Path:
    from flexkd_ds.jobs.distill import keep_resolved_config, student_ds_dict

    run = TaskRun(cfg)
    env, out, weights = run.env, run.out, run.weights
    t, s2 = cfg.train, cfg.seq2seq
    if weights.uses_feature and weights.feature_loss not in ("flexkd", "cka"):
        raise ValueError(
            f"task=seq2seq supports loss.feature_loss flexkd, cka or none; got {weights.feature_loss}"
        )
    source = s2s_data.resolve_source(cfg.data)
    teacher, student, tokenizer = model_specs(cfg)
    flexkd_on = weights.feature_loss == "flexkd" and weights.uses_feature
    pruned = cfg.model.resolved_student_init == "pruned"
    d_teacher, d_student = teacher.width, student.width
    if pruned:
        check_prune_request(cfg, teacher.config, d_student)
    if flexkd_on and d_student >= d_teacher:
        raise ValueError(f"flexkd selects d_S of the teacher's d_T units: d_S={d_student} >= d_T={d_teacher}")
    rows, valid_rows = load_rows(cfg, source)
    train_set = s2s_data.Seq2SeqDataset(rows, tokenizer, cfg.data.max_length, s2.max_target_length)
    pad_id = tokenizer.pad_token_id
    start_id = teacher.config.decoder_start_token_id
    start_id = tokenizer.eos_token_id if start_id is None else start_id
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        keep_resolved_config(cfg, out)
        logger.info("seq2seq: %d training rows, %d validation rows", len(train_set), len(valid_rows or []))

    t_ds = deepspeed_dict(cfg.deepspeed.teacher_config, micro_batch_size=t.micro_batch_size, grad_accum=1,
                          world_size=env.world_size, dtype=cfg.model.dtype)  # fmt: skip
    t_engine = None
    if weights.uses_feature or weights.uses_logit or pruned:
        t_engine = build_teacher_engine(lambda: load_seq2seq(teacher, engine_dtype(t_ds)), t_ds,
                                        sharded=teacher.source is not None)  # fmt: skip

    units, importance_hash = {}, None
    if flexkd_on or pruned:
        paths = {layer: out / f"importance.{layer}.safetensors" for layer in LAYERS}
        name = teacher.name
        reuse = all(
            reusable_importance(p, cfg, name, d_teacher, d_student, "seq2seq") for p in paths.values()
        )
        scores = (
            None if reuse else score_seq2seq(cfg, t_engine, train_set, env, pad_id, start_id, d_teacher, name)
        )
        hashes = []
        for layer in LAYERS:
            path = paths[layer]
            if reuse:
                indices = importance.load_importance(
                    path
                ).indices  # this run's own scores (a rerun or resume)
            else:
                indices = importance.select_units(scores[layer]["scores"], d_student)
                tail = importance.tail_mass(scores[layer]["scores"], d_student)
                meta = {**scores[layer]["metadata"], "tail_mass": f"{tail:.6f}"}
                if env.is_main:
                    importance.save_importance(path, scores[layer]["scores"], indices, meta)
                barrier()
            if flexkd_on:
                units[layer] = indices.to(env.device)
                check_unit_indices(units[layer], d_teacher, d_student)
            hashes.append(importance.importance_file_hash(path))
        if pruned:
            found = cut_importance(cfg, paths, out / "importance.cut.safetensors", d_student, env)
            hashes.append(importance.importance_file_hash(found.path))
            student = pruned_seq2seq(
                cfg, t_engine, teacher, tokenizer, train_set, env, pad_id, start_id, found
            )
            if (
                flexkd_on and cfg.loss.unit_pairing != "importance"
            ):  # both terms pair student unit m as it was cut
                units = {layer: found.indices.to(env.device) for layer in LAYERS}
                logger.info("flexkd pairs both layers' student unit m with teacher unit units[m], the unit it "
                            "was cut from; loss.unit_pairing=importance re-selects each layer's by importance")  # fmt: skip
        importance_hash = " ".join(hashes)

    s_ds = student_ds_dict(cfg, env, out)
    with sharded_init(s_ds, enabled=student.source is not None):
        s_model = load_seq2seq(student, engine_dtype(s_ds))
    module = DistillSeq2Seq(s_model)
    module.train()

    step = run.start_student(module, s_ds, len(train_set), importance_hash, "distill (seq2seq)")
    s_engine = run.engine
    decoder_weights = ObjectiveWeights(**{**weights.__dict__, "logit_loss": "none", "lm_weight": 0.0})
    try:
        while step < t.max_steps:
            batches = run.next_batches(train_set, lambda items: s2s_data.collate(items, pad_id, start_id))
            tokens = run.agree(sum(int((b["labels"] != -100).sum()) for b in batches), step)
            if tokens is None:  # preempted: checkpointed
                return out / "student"
            lr = s_engine.get_lr()[0]
            start = time.perf_counter()
            sums = torch.zeros(
                5, dtype=torch.float64, device=env.device
            )  # lm, logit, enc, dec, micro-batches
            for batch in batches:
                batch = {k: v.to(env.device) for k, v in batch.items()}
                label_rows = (batch["labels"].reshape(-1) != -100).nonzero().flatten()
                labels = batch["labels"].reshape(-1).index_select(0, label_rows)[None]
                t_logits = t_enc = t_dec = None
                if t_engine is not None:
                    with torch.no_grad():
                        t_out = t_engine(**model_inputs(batch), output_hidden_states=True, use_cache=False)
                    vocab = t_out.logits.shape[-1]
                    t_logits = t_out.logits.reshape(-1, vocab).index_select(0, label_rows)[None]
                    t_enc, t_dec = t_out.encoder_last_hidden_state, t_out.decoder_hidden_states[-1]
                s_logits, s_enc, s_dec = s_engine(model_inputs(batch), label_rows)
                common = {"global_tokens": tokens, "global_feature_rows": None, "grad_accum": t.grad_accum,
                          "world_size": env.world_size, "all_reduce": all_reduce_sum, "projected_hidden": None}  # fmt: skip
                enc_terms = micro_objective(
                    weights, student_logits=s_logits, teacher_logits=t_logits, labels=labels,
                    student_hidden=s_enc, teacher_hidden=t_enc, feature_mask=batch["attention_mask"].bool(),
                    unit_indices=units.get("encoder"), units_checked=flexkd_on, **common,
                )  # fmt: skip
                loss, dec_value = enc_terms.loss, torch.zeros((), device=env.device)
                if weights.uses_feature:
                    dec_terms = micro_objective(
                        decoder_weights, student_logits=None, teacher_logits=None, labels=labels,
                        student_hidden=s_dec, teacher_hidden=t_dec, feature_mask=batch["labels"] != -100,
                        unit_indices=units.get("decoder"), units_checked=flexkd_on, **common,
                    )  # fmt: skip
                    loss, dec_value = loss + dec_terms.loss, dec_terms.feature_value
                s_engine.backward(loss)
                s_engine.step()
                sums += torch.stack([enc_terms.lm_sum.double(), enc_terms.logit_sum.double(),
                                     enc_terms.feature_value.double(), dec_value.double(),
                                     torch.ones((), dtype=torch.float64, device=env.device)])  # fmt: skip
            totals = all_reduce_sum(sums).cpu()
            step += 1
            record = {"step": step, "lr": lr, "lm": float(totals[0] / tokens), "logit": float(totals[1] / tokens),
                      "feature_encoder": float(totals[2] / totals[4]), "feature_decoder": float(totals[3] / totals[4]),
                      "tokens": int(tokens), "step_s": time.perf_counter() - start}  # fmt: skip
            record["loss"] = (weights.lm_weight * record["lm"] * weights.uses_lm
                              + weights.beta * record["logit"] * weights.uses_logit
                              + weights.alpha * (record["feature_encoder"] + record["feature_decoder"])
                              * weights.uses_feature)  # fmt: skip
            run.log(record)
    finally:
        run.close()

    run.checkpoint(step)
    name_student(module.model.config, "student distilled", teacher.name, steps=step, output_dir=str(out))
    state = consolidated_state_dict(s_engine)
    student_dir = out / "student"
    if env.is_main:
        module.model.save_pretrained(student_dir, safe_serialization=True,
                                     state_dict={k.removeprefix("model."): v for k, v in state.items()})  # fmt: skip
        tokenizer.save_pretrained(student_dir)
        if valid_rows:
            result = rouge_of_summaries(student_dir, valid_rows, tokenizer, cfg.data.max_length, s2.generate_tokens,
                                        env.device)  # fmt: skip
            (out / "eval.json").write_text(json.dumps({"data": cfg.data.valid, **result}, indent=1) + "\n")
            logger.info("validation (%d rows, greedy, %d new tokens at most): ROUGE-2 %.2f, ROUGE-L %.2f",
                        result["rows"], s2.generate_tokens, result["rouge2"], result["rougeL"])  # fmt: skip
        logger.info(
            "done: %d steps in %.0f s; student %s", step, time.perf_counter() - run.start_time, student_dir
        )
    barrier()
    return student_dir


def cut_importance(
    cfg, paths: dict, cut_path: Path, d_student: int, env: DistEnv
) -> importance.ImportanceFile:
    """The units a pruned BART keeps. Its one width and tied embedding serve both stacks, so one set of units cuts
    both: each layer's scores scaled to mean 1 (their scales differ) and summed, the top d_S. Written beside the
    two layers' files (reused on a rerun)."""
    layers = {layer: importance.load_importance(path) for layer, path in paths.items()}
    scores = sum(
        found.scores.double() / found.scores.double().mean().clamp_min(1e-30) for found in layers.values()
    )
    scores = scores.float()
    if cut_path.is_file() and not cfg.importance.recompute:
        kept = importance.load_importance(cut_path)
        if torch.equal(kept.scores, scores) and kept.indices.numel() == d_student:
            return kept
    indices = importance.select_units(scores, d_student)
    meta = {**layers["decoder"].metadata, "layer": "last encoder and last decoder layer (each scaled to mean 1, summed)",
            "tail_mass": f"{importance.tail_mass(scores, d_student):.6f}"}  # fmt: skip
    if env.is_main:
        importance.save_importance(cut_path, scores, indices, meta)
    barrier()
    return importance.load_importance(cut_path)


def pruned_seq2seq(cfg, engine, teacher: ModelSpec, tokenizer, train_set, env: DistEnv, pad_id: int, start_id: int,
                   found: importance.ImportanceFile) -> ModelSpec:  # fmt: skip
    """The BART student cut from the teacher at ``found``'s units: ``prune.num_layers`` layers of each stack,
    heads, cross-attention heads and MLP neurons ranked on ``prune.num_examples`` training examples."""
    keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    return task_pruned_spec(cfg, engine, teacher, tokenizer, train_set,
                            lambda items: s2s_data.collate(items, pad_id, start_id), keys, found, env)  # fmt: skip


def score_seq2seq(
    cfg, engine, dataset, env: DistEnv, pad_id: int, start_id: int, d_teacher: int, teacher_name: str
) -> dict:
    """Both layers' importance from one pass per batch over ``importance.num_examples`` seeded examples, summed
    over every rank."""
    from flexkd_ds.jobs.score import scoring_order

    order = scoring_order(cfg, len(dataset))
    batches = sampling.shard_for_scoring(len(order), env.rank, env.world_size, cfg.importance.batch_size)
    module = engine.module
    params, weight, bias = head_of(module)
    with gathered(params):  # a whole copy: under ZeRO-3 the decoder's forward releases the tied embedding
        weight = weight.detach().clone()
    bias = None if bias is None else bias.detach().clone()
    accumulators = {layer: importance.ImportanceAccumulator(d_teacher) for layer in LAYERS}
    for positions in tqdm(
        batches, desc="importance (encoder + decoder)", disable=not env.is_main, unit="batch"
    ):
        items = [None if p is None else dataset[order[p]] for p in positions]
        batch = {k: v.to(env.device) for k, v in s2s_data.collate(items, pad_id, start_id).items()}
        with torch.no_grad():
            encoded = module.get_encoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )

        def decode(states, batch=batch):
            return module.get_decoder()(input_ids=batch["decoder_input_ids"],
                                        attention_mask=batch["decoder_attention_mask"], encoder_hidden_states=states,
                                        encoder_attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state  # fmt: skip

        scores = seq2seq_tangent_scores(encoded.last_hidden_state, decode, weight, bias,
                                        batch["attention_mask"].bool(), batch["labels"] != -100)  # fmt: skip
        counted = torch.tensor([p is not None for p in positions], dtype=torch.long)
        for layer in LAYERS:
            accumulators[layer].update(scores[layer], counted)
    result = {}
    for layer, acc in accumulators.items():
        acc.load_state_tensor(all_reduce_sum(acc.state_tensor().to(env.device)))
        result[layer] = {"scores": acc.scores(), "metadata": {
            "teacher": teacher_name, "layer": f"last {layer} layer", "functional": "sum_logprobs",
            "num_examples": str(acc.num_examples), "num_tokens": str(acc.num_tokens), "dataset": cfg.data.train,
            "seed": str(cfg.seed), "task": "seq2seq"}}  # fmt: skip
    return result


def rouge_of_summaries(student_dir: Path, rows: list[dict], tokenizer, max_length: int, new_tokens: int,
                       device) -> dict:  # fmt: skip
    """Greedy summaries of the exported student against the references: mean ROUGE-2 and ROUGE-L F1 x 100
    (``rouge-score``, stemmer on), the paper's metrics."""
    from rouge_score import rouge_scorer
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(student_dir).to(device).eval()
    scorer = rouge_scorer.RougeScorer(["rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge2": 0.0, "rougeL": 0.0}
    for row in rows:
        encoded = tokenizer(row["text"], truncation=True, max_length=max_length, return_tensors="pt").to(
            device
        )
        with torch.no_grad():
            ids = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        summary = tokenizer.decode(ids[0], skip_special_tokens=True)
        scores = scorer.score(row["target"], summary)
        for key in totals:
            totals[key] += 100.0 * scores[key].fmeasure
    return {key: value / len(rows) for key, value in totals.items()} | {"rows": len(rows)}
