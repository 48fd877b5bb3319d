"""The distill job: score (or reuse) the teacher's units, then train the student with
``L = alpha * L_feature + beta * L_logit + lambda * L_sup`` on DeepSpeed, with checkpoints, preemption
handling, metrics and a Hugging Face export."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from flexkd_ds.evaluation import run_report
from flexkd_ds.inputs import data
from flexkd_ds.inputs.config import ConfigError, DistillConfig, dump_yaml
from flexkd_ds.jobs.cache_teacher import cached_teacher, refuse_live_only
from flexkd_ds.jobs.common import (
    BUILTIN_PROMPTS,
    HOLDOUT,
    check_models,
    existing_importance,
    model_specs,
    name_student,
    needs_teacher_responses,
    setup_logging,
    teacher_engine,
    train_dataset,
)
from flexkd_ds.jobs.prune import check_prune_request, cut_units, existing_pruned, prune_student, pruned_spec
from flexkd_ds.jobs.score import (
    score_hidden,
    score_teacher,
    summarize,
    teacher_head,
    write_importance,
)
from flexkd_ds.jobs.step import (
    DistillStudent,
    Teacher,
    fusable,
    micro_batch,
    step_metrics,
    student_nll,
    teacher_nll,
    train_step,
    validation_nll_sums,
)
from flexkd_ds.method import importance
from flexkd_ds.method.losses import Projector, check_unit_indices
from flexkd_ds.method.objective import ObjectiveWeights
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.checkpoints import (
    checkpoint_problem,
    checkpoint_tags,
    consolidated_state_dict,
    load_checkpoint,
    resumable_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    world_size_mismatch,
)
from flexkd_ds.runtime.dist import DistEnv, all_reduce_sum, barrier, init_distributed
from flexkd_ds.runtime.engines import (
    HeadInput,
    build_student_engine,
    deepspeed_dict,
    engine_dtype,
    offload_optimizer_section,
    sharded_init,
)
from flexkd_ds.runtime.preemption import Preemption, stops_cleanly

logger = logging.getLogger("flexkd_ds")


def lr_multiplier(train_cfg):
    """step -> lr multiplier: linear warm-up, then constant / linear / cosine decay to ``min_lr_ratio``."""

    def multiplier(step: int) -> float:
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        if train_cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, train_cfg.max_steps - train_cfg.warmup_steps)
        progress = min(1.0, (step - train_cfg.warmup_steps) / span)
        floor = train_cfg.min_lr_ratio
        if train_cfg.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def student_ds_dict(cfg: DistillConfig, env: DistEnv, output_dir: Path) -> dict:
    t = cfg.train
    ds = deepspeed_dict(
        cfg.deepspeed.student_config,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        world_size=env.world_size,
        global_batch_size=t.global_batch_size,
        dtype=cfg.model.dtype,
    )
    # Always set: without the key DeepSpeed (0.19) clips at its default 1.0, so grad_clip=0 would not be "off".
    ds["gradient_clipping"] = t.grad_clip
    if ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        ds["optimizer"] = offload_optimizer_section(t.lr, t.betas, t.adam_eps, t.weight_decay)
    if cfg.deepspeed.tensorboard:
        ds["tensorboard"] = {
            "enabled": True,
            "output_path": str(output_dir / "tensorboard"),
            "job_name": "distill",
        }
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    offloaded = "offload_optimizer" in ds.get("zero_optimization", {})
    if env.world_size == 1 and stage in (1, 2) and not offloaded and env.is_main:
        logger.info(
            "one rank: ZeRO stage %d (%s) has nothing to shard; deepspeed.student_config="
            "ds_configs/student_zero0.json skips its gradient buckets and partition copies (7%% less step "
            "time on one CPU process, docs/benchmarks.md)", stage, cfg.deepspeed.student_config,
        )  # fmt: skip
    return ds


@stops_cleanly
def run_distill(cfg: DistillConfig) -> Path:
    """Run the whole distill job; returns the exported student directory."""
    if cfg.task == "classification":  # sequence classifiers: their own data, models and metric
        from flexkd_ds.jobs.classify import run_classify

        return run_classify(cfg)
    if cfg.task == "seq2seq":  # encoder-decoder summarisers: two selections, two correlation terms
        from flexkd_ds.jobs.seq2seq import run_seq2seq

        return run_seq2seq(cfg)
    preemption = Preemption.install()  # first: a signal during loading or scoring waits for a safe boundary
    run_start = time.perf_counter()
    env = init_distributed()
    setup_logging(env)
    out = Path(cfg.output_dir)
    weights = ObjectiveWeights.from_config(cfg.loss)
    t = cfg.train

    check_resume_config(cfg, out / "checkpoints", env.world_size)  # before anything is loaded or written
    if cfg.deepspeed.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            "deepspeed.tensorboard=true needs the tensorboard package (DeepSpeed's monitor writes through "
            "torch.utils.tensorboard): pip install tensorboard, or drop the option (metrics.jsonl and "
            "metrics.png have the same numbers)"
        )
    teacher, student, tokenizer = model_specs(cfg)
    check_models(cfg, teacher, student, tokenizer)
    if cfg.model.resolved_student_init == "pruned":
        check_prune_request(cfg, teacher.config, student.width)
    pad_id = data.pad_token_id(tokenizer)
    pruned = cfg.model.resolved_student_init == "pruned"
    flexkd_on = weights.feature_loss == "flexkd" and weights.uses_feature
    # a model.student dir cut by launch/prune.py pairs by its prune.json (loss.unit_pairing)
    units_by_cut = cut_units(cfg, teacher, student) if flexkd_on else None
    uses_units = (flexkd_on and units_by_cut is None) or pruned
    found = existing_importance(cfg, teacher, student.width) if uses_units else None  # refuses a foreign file
    # the teacher also writes responses (data.responses=teacher) and scores the held-out set at the end
    needs_teacher = weights.uses_feature or weights.uses_logit or pruned or needs_teacher_responses(cfg)
    needs_teacher = needs_teacher or cfg.data.valid is not None
    # teacher_cache.dir: the teacher's LM-head inputs come from the cache; only its head is resident
    use_cache = cfg.teacher_cache.dir is not None and (weights.uses_feature or weights.uses_logit)
    if use_cache:
        refuse_live_only(cfg, teacher)
        needs_teacher = False
    elif cfg.teacher_cache.dir is not None:
        logger.info("teacher_cache.dir is set but no loss reads the teacher: the cache is not used")
    t_engine = teacher_engine(cfg, teacher, env, t.micro_batch_size) if needs_teacher else None
    dataset = train_dataset(cfg, tokenizer, env, engine=t_engine, teacher_name=teacher.name)
    cached = cached_teacher(cfg, teacher, dataset, env, pad_id) if use_cache else None
    valid_set = None
    if cfg.data.valid:
        # None: data.valid=holdout on too small a training set (logged)
        valid_set = train_dataset(cfg, tokenizer, env, valid=True, engine=t_engine, teacher_name=teacher.name)
    if (
        env.is_main
    ):  # inputs checked: only now write the config (a refused launch leaves output_dir as it was)
        out.mkdir(parents=True, exist_ok=True)
        keep_resolved_config(cfg, out)
        logger.info("resolved config written to %s", out / "config.resolved.yaml")

    unit_indices, importance_hash = None, None
    if uses_units:
        if found is None:
            if cached is not None:  # the same closed form on the cached LM-head inputs
                head_weight, head_bias = cached.head_weight_and_bias()
                accumulator = score_hidden(
                    cfg, dataset, env, pad_id, head_weight, head_bias,
                    lambda batch, ids: cached.hidden(ids, batch["input_ids"].shape[1]),
                )  # fmt: skip
            else:
                accumulator = score_teacher(cfg, t_engine, dataset, env, pad_id)
            found = write_importance(cfg, teacher, accumulator, student.width, env)
        else:
            logger.info("reusing importance file %s", found.path)
        if env.is_main:
            logger.info(summarize(found))
        unit_indices = found.indices.to(env.device)
        importance_hash = importance.importance_file_hash(found.path)
    if pruned:  # the student starts as the teacher's top units: Flex-KD's pairing is the pruning's identity
        student_dir = existing_pruned(cfg, teacher, found)
        if student_dir is None:
            student_dir = prune_student(cfg, t_engine, teacher, tokenizer, dataset, env, pad_id, found)
        else:
            logger.info("reusing the pruned student in %s", student_dir)
        student = pruned_spec(student_dir, cfg.seed)
    if units_by_cut is not None:
        unit_indices = torch.tensor(units_by_cut, dtype=torch.long, device=env.device)
        importance_hash = "prune.json units " + hashlib.sha256(json.dumps(units_by_cut).encode()).hexdigest()
    if not flexkd_on:
        unit_indices = None
    elif env.is_main:  # which teacher unit each student unit is trained against, and why
        how = "pruning" if units_by_cut is not None or pruned else "importance"
        (out / "unit_pairing.json").write_text(json.dumps({
            "pairing": how, "student": student.name, "teacher": teacher.name,
            "units": unit_indices.tolist(), "note": "student unit m is paired with teacher unit units[m]",
        }, indent=1))  # fmt: skip
    if unit_indices is not None:  # checked once here, not on every step (each check is a host sync)
        check_unit_indices(unit_indices, teacher.width, student.width)
    fused = fused_logits_choice(cfg, weights, teacher, t_engine, cached)
    live = Teacher(engine=t_engine, capture=HeadInput(t_engine.module)) if t_engine is not None else Teacher()
    per_step = t.teacher_per_step and t.grad_accum > 1 and weights.uses_logit and t_engine is not None
    if (fused or per_step) and t_engine is not None:
        live.head = teacher_head(t_engine)  # held whole on every rank, like the cache's head
    teacher_valid = None
    if (
        valid_set is not None and t_engine is not None
    ):  # the reference the student's held-out NLL is read against
        teacher_valid = validation_nll_sums(
            teacher_nll(live, fused), valid_set, env, pad_id, t.micro_batch_size
        )
    elif valid_set is not None and cached is not None:
        logger.info("teacher cache: the teacher's held-out NLL (a reference only) is not measured")
    if not (weights.uses_logit or per_step):
        live.head = None  # the chunked loss reads the teacher's head only for the logit term (and teacher_valid)
    if not (weights.uses_feature or weights.uses_logit):
        t_engine = None  # only the pruning / the responses / the reference needed it
        live.capture.remove() if live.capture is not None else None
        live = Teacher()
    if cached is not None:
        live = Teacher(cached=cached, head=cached.head_weight_and_bias() if fused else None)

    s_ds = student_ds_dict(cfg, env, out)
    with sharded_init(s_ds, enabled=student.source is not None):  # random init: built whole, same weights
        s_model = student.load(engine_dtype(s_ds))
        projector = None
        if weights.feature_loss == "projector":
            with torch.random.fork_rng(devices=[]):  # seeded like the random models (the global RNG is not)
                torch.manual_seed(cfg.seed + 2)
                projector = Projector(student.width, teacher.width)
    module = DistillStudent(s_model, projector)
    module.train()
    if fused and (reason := fusable(s_model)) is not None:
        logger.info("loss.fused_logits: the student's logits are formed whole: %s", reason)
        fused = False
        live.head = live.head if per_step else None

    def optimizer_factory(params):
        fused = {"fused": True} if env.device.type == "cuda" else {}
        return torch.optim.AdamW(
            params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay, **fused
        )

    s_engine = build_student_engine(module, s_ds, optimizer_factory, lr_multiplier(t))
    sampler = sampling.ResumableDistributedSampler(
        len(dataset), rank=env.rank, world_size=env.world_size, seed=cfg.seed
    )
    ckpt_dir = out / "checkpoints"
    start_step = resume(cfg, s_engine, sampler, ckpt_dir, importance_hash, env)
    student_valid_start = None
    if valid_set is not None and start_step == 0:
        student_valid_start = validation_nll_sums(
            student_nll(s_engine, weights, fused), valid_set, env, pad_id, t.micro_batch_size
        )

    best = BestStudent(out, start_step) if t.save_best and valid_set is not None else None
    if t.save_best and valid_set is None:
        logger.info("train.save_best: no validation rows this run, so no student-best/")
    if env.is_main:
        trim_metrics(out / "metrics.jsonl", start_step)
    metrics_file = open(out / "metrics.jsonl", "a") if env.is_main else None  # noqa: SIM115
    bar = tqdm(total=t.max_steps, initial=start_step, desc="distill", disable=not env.is_main, unit="step")
    last = {}
    step = start_step
    try:
        while step < t.max_steps:
            # Where a preemption checkpoint must put the sampler: before this step's (then untrained) examples.
            sampler_before = sampler.state_dict()
            micro_batches = [micro_batch(dataset, sampler.next_indices(t.micro_batch_size), pad_id, env)
                             for _ in range(t.grad_accum)]  # fmt: skip
            local_tokens = sum(b["counts_host"]["tokens"] for b in micro_batches)  # counted on the host
            local_rows = sum(b["counts_host"][cfg.loss.feature_tokens] for b in micro_batches)
            agreed = all_reduce_sum(
                torch.tensor(
                    [float(local_tokens), float(preemption.requested), float(local_rows)], device=env.device
                )
            )
            if agreed[1] > 0:
                logger.info("preemption signal: checkpointing at step %d and exiting", step)
                sampler.load_state_dict(sampler_before)
                checkpoint(s_engine, sampler, ckpt_dir, step, importance_hash, cfg)
                return out / "student"
            lr = s_engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside the step)
            evaluating = valid_set is not None and (
                step + 1 == t.max_steps or (t.eval_every and (step + 1) % t.eval_every == 0)
            )
            logging_step = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps or evaluating
            raw = train_step(
                cfg, weights, live, s_engine, micro_batches, float(agreed[0]), unit_indices, env,
                global_rows=float(agreed[2]), fused=fused, timed=logging_step,
                pad_id=pad_id if t.teacher_per_step else None,
            )  # fmt: skip
            step += 1
            valid_lm = None
            if evaluating:
                valid_lm = validation_nll_sums(
                    student_nll(s_engine, weights, fused), valid_set, env, pad_id, t.micro_batch_size
                )
                if best is not None and valid_lm < best.valid_lm:  # the same value on every rank (all-reduced)
                    name_student(module.model.config, "student distilled (lowest validation NLL)", teacher.name,
                                 steps=step, valid_lm=valid_lm, output_dir=str(out))  # fmt: skip
                    best.save(s_engine, module, tokenizer, env, step, valid_lm)
            if env.is_main:
                bar.update(1)
            if logging_step:  # otherwise the step's numbers stay on the device: no host sync
                last = {**step_metrics(raw), "step": step, "lr": lr, "time": round(time.time(), 3)}
                if valid_lm is not None:
                    last["valid_lm"] = valid_lm
                write_metrics(last, metrics_file, bar, s_engine, step)
            if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                checkpoint(s_engine, sampler, ckpt_dir, step, importance_hash, cfg)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    checkpoint(s_engine, sampler, ckpt_dir, step, importance_hash, cfg)
    name_student(module.model.config, "student distilled", teacher.name, steps=step, output_dir=str(out))
    student_dir = export_student(s_engine, module, tokenizer, out, env)
    if env.is_main:
        heldout = None
        if "valid_lm" in last:
            report = heldout_report(
                cfg, len(valid_set), student_valid_start, last["valid_lm"], teacher_valid, start_step
            )
            heldout = report["text"]
            (out / "heldout.json").write_text(json.dumps(report["numbers"], indent=1) + "\n")
        rows = [r for r in run_report.read_metrics(out / "metrics.jsonl") if r["step"] > start_step]
        plot = run_report.plot_metrics(run_report.read_metrics(out / "metrics.jsonl"), out / "metrics.png")
        lines = run_report.summary_lines(
            rows, time.perf_counter() - run_start, student_dir, out / "metrics.jsonl", plot, heldout
        )
        if best is not None and best.step is not None:
            lines.append(f"lowest validation NLL {best.valid_lm:.4f} at step {best.step}: {out / BEST_DIR}")
        for line in lines:
            logger.info(line)
    return student_dir


def heldout_report(cfg, rows: int, start, end, teacher, start_step: int) -> dict:
    """What the run bought, on data.valid: the student's response NLL before and after, and the teacher's."""
    numbers = {"data": cfg.data.valid, "rows": rows, "student_start": start, "student_end": end,
               "teacher": teacher, "steps": cfg.train.max_steps, "resumed_from_step": start_step or None}  # fmt: skip
    where = f"held-out {cfg.data.valid} ({rows} rows)"
    if cfg.data.valid == HOLDOUT:
        where = f"held-out rows of {cfg.data.train} ({rows} rows, never trained on)"
    if cfg.data.valid == BUILTIN_PROMPTS:
        where += ", prompts never trained on, answered by the teacher"
    parts = [f"student {start:.3f} -> {end:.3f}" if start is not None else f"student {end:.3f}"]
    if teacher is not None:
        parts.append(f"teacher {teacher:.3f}")
    text = f"{where}: response NLL (nats/token) " + ", ".join(parts)
    return {"text": text, "numbers": numbers}


def fused_logits_choice(cfg: DistillConfig, weights: ObjectiveWeights, teacher, t_engine, cached) -> bool:
    """Whether the LM and logit terms run chunked (``loss.fused_logits``); says why when they cannot."""
    if not cfg.loss.fused_logits or not (weights.uses_logit or weights.uses_lm):
        return False
    if weights.uses_logit and t_engine is not None and cached is None:
        reason = fusable(t_engine.module)
        if reason is not None:
            logger.info("loss.fused_logits: the logits are formed whole: the teacher %s", reason)
            return False
    return True


def write_metrics(last: dict, metrics_file, bar, s_engine, step: int) -> None:
    """One logging step's numbers: a metrics.jsonl line (rank 0), the progress bar, DeepSpeed's monitor."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(last) + "\n")
        metrics_file.flush()
    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
    if s_engine.monitor.enabled if hasattr(s_engine, "monitor") else False:
        s_engine.monitor.write_events([(f"train/{k}", v, step) for k, v in last.items() if k != "step"])


def trim_metrics(path: Path, start_step: int) -> int:
    """Make ``metrics.jsonl`` end at ``start_step`` before a (resumed) run appends to it: drop the lines of
    steps after it (logged by a run that died after its last checkpoint, and about to be trained again) and a
    torn last line. Returns how many lines were dropped; the file is replaced atomically."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= start_step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        logger.info("%s: dropped %d line(s) after step %d (to be trained again)", path, dropped, start_step)
    return dropped


CHECKPOINT_CONFIG = "flexkd_config.yaml"  # inside each checkpoint: the config it was trained with
# Keys a resumed run may change: when to stop (raising it continues), logging, evaluation and saving cadence.
RESUMABLE_CHANGES = ("train.max_steps", "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.save_best", "train.resume", "deepspeed.tensorboard")  # fmt: skip


def checkpoint(s_engine, sampler, ckpt_dir: Path, step: int, importance_hash: str | None, cfg) -> None:
    client_state = {"step": step, "importance_hash": importance_hash, "sampler": sampler.state_dict()}
    rank_state = {"rng": rng_state(), "sampler": sampler.state_dict()}
    files = {CHECKPOINT_CONFIG: OmegaConf.to_yaml(cfg.to_dict())}
    keep = cfg.train.keep_checkpoints
    save_checkpoint(s_engine, ckpt_dir, f"step{step:08d}", client_state, rank_state, keep, files)
    logger.info("checkpoint step %d saved in %s", step, ckpt_dir)


def _leaves(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_resume_config(cfg: DistillConfig, ckpt_dir: Path, world_size: int) -> None:
    """Before anything is loaded or written: a ``train.resume=auto`` rerun in the same output_dir continues
    only when its config differs from the one the checkpoint was trained with in ``RESUMABLE_CHANGES``
    (``train.max_steps`` not below the checkpoint's step); any other difference stops the run, naming the keys
    and the two ways out."""
    if cfg.train.resume != "auto":
        return
    tags, _ = resumable_checkpoints(ckpt_dir, world_size)
    if not tags or not (ckpt_dir / tags[0] / CHECKPOINT_CONFIG).is_file():
        return
    saved = _leaves(yaml.safe_load((ckpt_dir / tags[0] / CHECKPOINT_CONFIG).read_text(encoding="utf-8")))
    now = _leaves(yaml.safe_load(OmegaConf.to_yaml(cfg.to_dict())))
    differ = sorted(
        k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES
    )
    step = int(tags[0].removeprefix("step"))
    if differ:
        lines = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(
            f"{cfg.output_dir} holds a checkpoint ({tags[0]}) trained with another config ({lines}); resuming "
            "would mix the two. Use a new output_dir, or train.resume=never to start over in this one (only "
            f"{', '.join(RESUMABLE_CHANGES)} may change on resume)",
            differ,
        )
    if cfg.train.max_steps < step:
        raise ConfigError(
            f"train.max_steps={cfg.train.max_steps} is below the checkpoint's step {step} in {ckpt_dir}: raise it, "
            "use a new output_dir, or train.resume=never",
            "train.max_steps",
        )


def keep_resolved_config(cfg: DistillConfig, out: Path) -> Path:
    """Write ``config.resolved.yaml``; a different one from an earlier run segment is kept beside it as
    ``config.resolved.<n>.yaml`` (n = 1, 2, ...), so every segment's config stays on record."""
    path = out / "config.resolved.yaml"
    if not path.is_file():
        return dump_yaml(cfg, path)
    fresh = dump_yaml(cfg, out / ".config.resolved.new.yaml")
    if fresh.read_text() == path.read_text():
        fresh.unlink()
        return path
    n = 1 + sum(1 for _ in out.glob("config.resolved.*.yaml"))
    os.replace(path, out / f"config.resolved.{n}.yaml")
    os.replace(fresh, path)
    return path


def resume(cfg: DistillConfig, s_engine, sampler, ckpt_dir: Path, importance_hash: str | None, env) -> int:
    """Load the checkpoint ``train.resume`` asks for; returns the step to continue from (0 if none).

    ``auto``: the newest complete checkpoint that loads on every rank; each newer one that is incomplete
    (a save that did not finish, a missing or truncated file) or does not load is named with what is wrong,
    and the previous one is tried. A path: that checkpoint, or an error saying what is wrong with it."""
    mode = cfg.train.resume
    if mode == "never":
        return 0
    if mode == "auto":
        directory = ckpt_dir
        mismatch = world_size_mismatch(directory, env.world_size)
        if mismatch is not None:
            raise ValueError(mismatch)
        tags, skipped = resumable_checkpoints(directory, env.world_size)
        for line in skipped:
            logger.warning("checkpoint %s; falling back to an older one", line)
        if not tags:
            if skipped:
                logger.warning("no complete checkpoint in %s: training starts from step 0", directory)
            return 0
    else:
        path = Path(mode)
        if (path / "latest").is_file() or checkpoint_tags(path):
            directory = path
            tags, skipped = resumable_checkpoints(path, env.world_size)
            if not tags:
                raise ValueError(
                    f"train.resume={mode!r}: no complete checkpoint there ({'; '.join(skipped)})"
                )
        elif path.is_dir():
            directory, tags = path.parent, [path.name]
            problem = checkpoint_problem(directory, path.name, env.world_size)
            if problem is not None:
                raise ValueError(
                    f"train.resume={mode!r}: {problem}; name an older checkpoint, or train.resume=never"
                )
        else:
            raise FileNotFoundError(f"train.resume={mode!r}: no such checkpoint directory")
    for tag in tags:
        try:
            client_state, rank_state = load_checkpoint(s_engine, directory, tag)
            failed = 0.0
        except Exception as err:  # noqa: BLE001 - a damaged file: every rank must move on together
            logger.warning("checkpoint %s could not be loaded on rank %d: %s", directory / tag, env.rank, err)
            failed = 1.0
        if all_reduce_sum(torch.tensor([failed], device=env.device)).item() == 0:
            break
        if mode != "auto":
            raise ValueError(
                f"train.resume={mode!r}: checkpoint {tag} could not be loaded (see the log above)"
            )
        logger.warning("checkpoint %s did not load on every rank; falling back to an older one", tag)
    else:
        logger.warning("no checkpoint in %s loads: training starts from step 0", directory)
        return 0
    saved_hash = client_state.get("importance_hash")
    if saved_hash != importance_hash:
        raise ValueError(
            f"checkpoint {directory / tag} was trained with a different importance file (or feature loss); "
            "resume with the file it used, or start fresh with train.resume=never"
        )
    sampler.load_state_dict(rank_state["sampler"])
    set_rng_state(rank_state["rng"])
    logger.info("resumed from %s at step %d", directory / tag, client_state["step"])
    return int(client_state["step"])


BEST_DIR = "student-best"


class BestStudent:
    """``train.save_best``: the student of the lowest validation NLL so far, in ``<output_dir>/student-best``.

    Written to ``student-best.tmp`` and renamed, so a run stopped during the save keeps the previous best. A
    resumed run keeps the best only if it was reached at or before the step it resumes from: a later one lies on
    the part of the run that is trained again (bit for bit, so it comes back)."""

    def __init__(self, out: Path, start_step: int):
        self.out, self.step, self.valid_lm = out, None, math.inf
        saved = out / BEST_DIR / "best.json"
        if start_step > 0 and saved.is_file():
            record = json.loads(saved.read_text())
            if record["step"] <= start_step:
                self.step, self.valid_lm = record["step"], record["valid_lm"]

    def save(self, s_engine, module, tokenizer, env: DistEnv, step: int, valid_lm: float) -> None:
        tmp, final = self.out / f"{BEST_DIR}.tmp", self.out / BEST_DIR
        if env.is_main and tmp.exists():
            shutil.rmtree(tmp)  # left by a run stopped during a save
        export_student(s_engine, module, tokenizer, self.out, env, name=tmp.name, projector=False)
        if env.is_main:
            (tmp / "best.json").write_text(json.dumps({"step": step, "valid_lm": valid_lm}, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        barrier()
        self.step, self.valid_lm = step, valid_lm


def export_student(s_engine, module: DistillStudent, tokenizer, out: Path, env: DistEnv, name: str = "student",
                   projector: bool = True) -> Path:  # fmt: skip
    """``<out>/<name>/`` in Hugging Face format (+ tokenizer); the projector, if any (and ``projector``),
    beside it."""
    state = consolidated_state_dict(s_engine)  # collective under ZeRO-3
    student_dir = out / name
    if env.is_main:
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        module.model.save_pretrained(student_dir, state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(student_dir)
        projector_state = {
            k.removeprefix("projector."): v.contiguous()
            for k, v in state.items()
            if k.startswith("projector.")
        }
        if projector_state and projector:
            save_file(projector_state, str(out / "projector.safetensors"))
    barrier()
    return student_dir
