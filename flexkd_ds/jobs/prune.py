"""The prune job (``launch/prune.py``, and the start of distill with ``model.student_init=pruned``): cut the
student out of the teacher by keeping its highest-scored units.

Setup (the teacher as its ZeRO-3 inference engine, the importance file of ``output_dir`` or a fresh score
job), statistics (block importance, MLP neuron and head magnitudes, norm ratios) over ``prune.num_examples``
training examples sharded over all ranks and all-reduced, the plan (``method.prune.make_plan``), then the cut:
each teacher tensor is gathered alone (ZeRO-3), sliced, and only the student's slices are kept, so no rank
ever holds the whole teacher. Rank 0 writes a Hugging Face dir with the tokenizer and ``prune.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexkd_ds import __version__
from flexkd_ds.inputs import data, models
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.common import ModelSpec, name_student
from flexkd_ds.jobs.score import feature_rows, scoring_order
from flexkd_ds.method import importance, prune
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.dist import DistEnv, all_reduce_sum, barrier
from flexkd_ds.runtime.engines import gathered
from flexkd_ds.runtime.preemption import stops_cleanly

logger = logging.getLogger("flexkd_ds")

PRUNE_FILE = "prune.json"
TASK_FAMILIES = {  # the families each task's model class can be cut from
    "causal_lm": ("gpt2", "llama", "opt"),
    "classification": ("bert", "gpt2", "llama", "opt"),
    "seq2seq": ("bart",),
}


def check_prune_request(cfg: DistillConfig, teacher_config, d_student: int) -> None:
    """Refuse, before anything is written, a request the teacher cannot meet: an unsupported family, d_S >= d_T,
    more layers or MLP neurons than it has, an OPT/GPT-2 width that is not whole heads, a LLaMA width that is not
    a multiple of the head count, a family the task's model class cannot be cut from."""
    shapes = prune.teacher_shapes(teacher_config)  # names the family when it is not supported
    task = getattr(cfg, "task", "causal_lm")
    if shapes.family not in TASK_FAMILIES[task]:
        raise ValueError(
            f"task={task}: a pruned student cannot be cut from a teacher of family {shapes.family}; this task "
            f"prunes {list(TASK_FAMILIES[task])}, "
            + "; ".join(f"task={t}: {list(f)}" for t, f in TASK_FAMILIES.items() if t != task)
        )
    checks = [
        ("model.student_arch.hidden_size", d_student, shapes.d_teacher - 1, "d_S < d_T"),
        ("prune.num_layers", cfg.prune.num_layers, shapes.num_layers, "the teacher's layers"),
        (
            "prune.intermediate_size",
            cfg.prune.intermediate_size,
            shapes.intermediate,
            "the teacher's MLP width",
        ),
    ]
    for key, value, upper, what in checks:
        if value is not None and not 1 <= value <= upper:
            raise ValueError(f"{key}={value} is out of range: it must be in [1, {upper}] ({what}: {upper})")
    if shapes.family == "llama" and d_student % shapes.num_heads:
        lower = d_student - d_student % shapes.num_heads
        nearest = [w for w in (lower, lower + shapes.num_heads) if 0 < w < shapes.d_teacher]
        raise ValueError(
            f"model.student_arch.hidden_size={d_student}: a pruned LLaMA student keeps the teacher's "
            f"{shapes.num_heads} attention heads, and transformers' LlamaConfig refuses a hidden_size that is not "
            f"a multiple of num_attention_heads; use a multiple of {shapes.num_heads}, e.g. "
            + " or ".join(map(str, nearest))
        )
    if shapes.family != "llama" and not shapes.projected and d_student % shapes.head_dim:
        raise ValueError(
            f"model.student_arch.hidden_size={d_student}: a pruned {shapes.family} student keeps whole heads of "
            f"{shapes.head_dim} channels; use a multiple of {shapes.head_dim}"
        )


def prune_statistics(
    cfg: DistillConfig, engine, dataset: data.InstructionDataset, env: DistEnv, pad_id: int, units: list[int]
) -> prune.PruneStatistics:
    """Statistics of the full teacher over the first ``prune.num_examples`` examples of the scoring order,
    each rank its share (padded so every rank runs the teacher equally often), summed over all ranks."""
    order = scoring_order(cfg.replace(**{"importance.num_examples": cfg.prune.num_examples}), len(dataset))
    shards = sampling.shard_for_scoring(len(order), env.rank, env.world_size, cfg.importance.batch_size)

    def batches():
        for positions in tqdm(shards, desc="prune statistics", disable=not env.is_main, unit="batch"):
            examples = [None if p is None else dataset[order[p]] for p in positions]
            batch = {k: v.to(env.device) for k, v in data.collate(examples, pad_id).items()}
            mask = feature_rows(batch, "all").long()  # placeholders are fully masked
            yield {"input_ids": batch["input_ids"], "attention_mask": mask}

    stats = prune.collect_prune_statistics(engine, batches(), units)
    stats.load_state_tensor(all_reduce_sum(stats.state_tensor().to(env.device)).cpu())
    return stats


def task_prune_batches(cfg: DistillConfig, dataset, collate, keys: tuple[str, ...], env: DistEnv):
    """The classification / seq2seq jobs' statistics batches: the first ``prune.num_examples`` of the scoring
    order, each rank its share; a rank's padding rows are marked out by ``example_mask``."""
    order = scoring_order(cfg.replace(**{"importance.num_examples": cfg.prune.num_examples}), len(dataset))
    shards = sampling.shard_for_scoring(len(order), env.rank, env.world_size, cfg.importance.batch_size)
    for positions in tqdm(shards, desc="prune statistics", disable=not env.is_main, unit="batch"):
        batch = collate([None if p is None else dataset[order[p]] for p in positions])
        real = torch.tensor([p is not None for p in positions])
        yield {k: batch[k].to(env.device) for k in keys} | {"example_mask": real.to(env.device)}


def cut_student(engine, plan: prune.PrunePlan, env: DistEnv):
    """The student of ``plan`` on rank 0 (None elsewhere): every teacher parameter is gathered alone and
    sliced at once, so the peak is the student plus one teacher tensor."""
    teacher = getattr(engine, "module", engine)
    persistent = set(teacher.state_dict())
    named = list(teacher.named_parameters()) + [(n, b) for n, b in teacher.named_buffers() if n in persistent]
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(named, desc="prune", disable=not env.is_main, unit="tensor"):
        # named_parameters lists a tied head once, under the embedding: assemble_student ties it again
        with gathered([tensor] if isinstance(tensor, torch.nn.Parameter) else []):
            if env.is_main:
                full = tensor.detach().to("cpu", copy=True)
                state.update(prune.prune_tensor(name, full, plan, teacher.config))
    if not env.is_main:
        return None
    buffers = {n: b.detach().cpu() for n, b in teacher.named_buffers() if n not in persistent}
    return prune.assemble_student(teacher.config, plan, state, buffers, model_class=type(teacher))


def prune_student(
    cfg: DistillConfig,
    engine,
    teacher: ModelSpec,
    tokenizer,
    dataset: data.InstructionDataset,
    env: DistEnv,
    pad_id: int,
    found: importance.ImportanceFile,
) -> Path:
    """Measure, plan, cut and write the pruned student; returns its directory (on every rank)."""
    units = found.indices.tolist()
    start = time.perf_counter()
    stats = prune_statistics(cfg, engine, dataset, env, pad_id, units)
    return write_pruned(cfg, engine, teacher, tokenizer, units, stats, found, env, start)


def prune_task_student(cfg: DistillConfig, engine, teacher: ModelSpec, tokenizer, units: list[int], batches,
                       found: importance.ImportanceFile, env: DistEnv) -> Path:  # fmt: skip
    """The classification / seq2seq jobs' pruned student (``task_prune_batches``): statistics over all ranks,
    the plan, the cut of the teacher's own class; returns its directory (on every rank)."""
    start = time.perf_counter()
    stats = prune.collect_prune_statistics(engine, batches, units)
    stats.load_state_tensor(all_reduce_sum(stats.state_tensor().to(env.device)).cpu())
    return write_pruned(cfg, engine, teacher, tokenizer, units, stats, found, env, start)


def task_pruned_spec(cfg: DistillConfig, engine, teacher: ModelSpec, tokenizer, dataset, collate, keys: tuple[str, ...],
                     found: importance.ImportanceFile, env: DistEnv) -> ModelSpec:  # fmt: skip
    """The classification / seq2seq student cut from the teacher at ``found``'s units (reused when this
    output_dir already holds the same cut), as a pretrained model spec."""
    student_dir = existing_pruned(cfg, teacher, found)
    if student_dir is None:
        batches = task_prune_batches(cfg, dataset, collate, keys, env)
        student_dir = prune_task_student(cfg, engine, teacher, tokenizer, found.indices.tolist(), batches, found, env)
    elif env.is_main:
        logger.info("reusing the pruned student in %s", student_dir)
    return pruned_spec(student_dir, cfg.seed)


def write_pruned(cfg: DistillConfig, engine, teacher: ModelSpec, tokenizer, units: list[int],
                 stats: prune.PruneStatistics, found: importance.ImportanceFile, env: DistEnv, start: float) -> Path:  # fmt: skip
    """Plan by ``stats``, cut, and write the student dir with its ``prune.json`` (rank 0); every rank waits."""
    out = cfg.prune.resolved_dir(cfg.output_dir)
    plan = prune.make_plan(
        teacher.config,
        units,
        stats,
        num_layers=cfg.prune.num_layers,
        intermediate_size=cfg.prune.intermediate_size,
        calibrate_norms=cfg.prune.calibrate_norms,
    )
    student = cut_student(engine, plan, env)
    if env.is_main:
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        name_student(student.config, "student pruned", teacher.name, d_student=len(units))
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "teacher": teacher.name,
            "importance_file": str(found.path),
            "importance_sha256": importance.importance_file_hash(found.path),
            "d_teacher": len(found.scores),
            "d_student": len(units),
            "calibration": {
                "data": cfg.data.train,
                "num_examples": cfg.prune.num_examples,
                "seed": cfg.seed,
                "calibrate_norms": cfg.prune.calibrate_norms,
            },
            "num_layers": cfg.prune.num_layers,
            "intermediate_size": cfg.prune.intermediate_size,
            "plan": json.loads(plan.to_json()),
            "created_by": f"flexkd_ds {__version__}",
        }
        (tmp / PRUNE_FILE).write_text(json.dumps(record, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        params = sum(p.numel() for p in student.parameters())
        logger.info(
            "pruned student: %d of %d units, %d of %d layers, %.1fM parameters, in %.1f s -> %s",
            len(units), len(found.scores), len(plan.layers), prune.teacher_shapes(teacher.config).num_layers,
            params / 1e6, time.perf_counter() - start, out,
        )  # fmt: skip
    barrier()
    return out


def pruned_spec(student_dir: Path, seed: int) -> ModelSpec:
    """The pruned student as a pretrained model spec (loaded sharded under ZeRO-3 like any other)."""
    source = models.resolve_model_source(str(student_dir))
    return ModelSpec(f"pruned:{student_dir}", models.load_config(source), source, seed)


def cut_units(cfg: DistillConfig, teacher: ModelSpec, student: ModelSpec) -> list[int] | None:
    """Flex-KD's pairing by pruning for a ``model.student`` dir cut by launch/prune.py: the teacher units its
    ``prune.json`` says it was cut from (student unit m = teacher unit ``units[m]``); None when the pairing
    is the importance pass's (``loss.unit_pairing``, DESIGN.md). ``student_init=pruned`` is not handled here:
    its units are the importance file's, which the cut used."""
    mode = cfg.loss.unit_pairing
    if mode == "importance" or cfg.model.resolved_student_init == "pruned":
        return None
    source = student.source
    path = (
        Path(source.path_or_name) / PRUNE_FILE if source is not None and source.kind == "local_dir" else None
    )
    if path is None or not path.is_file():
        if mode == "pruning":
            raise ValueError(
                f"loss.unit_pairing=pruning needs a pruned student (model.student_init=pruned, or a "
                f"model.student dir written by launch/prune.py, with {PRUNE_FILE}); {student.name} has none: "
                "set loss.unit_pairing=importance (or auto)"
            )
        return None
    record = json.loads(path.read_text())
    units = record.get("plan", {}).get("units")
    wanted = {"teacher": teacher.name, "d_teacher": teacher.width, "d_student": student.width}
    differ = {k: (record.get(k), v) for k, v in wanted.items() if record.get(k) != v}
    if units is not None and len(units) != student.width:
        differ["plan.units"] = (f"{len(units)} units", f"{student.width} units")
    if units is None or differ:
        what = "; ".join(f"{k}: {a!r} in {PRUNE_FILE}, {b!r} in this run" for k, (a, b) in differ.items())
        raise ValueError(
            f"loss.unit_pairing={mode}: {path} does not describe this pair ({what or 'no plan.units'}); use "
            "the teacher the student was cut from, or set loss.unit_pairing=importance to pair by a fresh "
            "importance pass"
        )
    logger.info(
        "flexkd pairs student unit m with teacher unit units[m], the unit it was cut from (%s); "
        "loss.unit_pairing=importance re-selects them by importance", path,
    )  # fmt: skip
    return [int(u) for u in units]


def existing_pruned(cfg: DistillConfig, teacher: ModelSpec, found: importance.ImportanceFile) -> Path | None:
    """The pruned student dir to reuse (made from this importance file and these prune settings), None to cut
    one; raises when the dir was cut for another teacher, importance file or settings."""
    out = cfg.prune.resolved_dir(cfg.output_dir)
    record_path = out / PRUNE_FILE
    if not record_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise ValueError(
                f"{out} exists but holds no {PRUNE_FILE}: it is not a pruned student; point prune.dir elsewhere"
            )
        return None
    record = json.loads(record_path.read_text())
    wanted = {
        "teacher": teacher.name,
        "importance_sha256": importance.importance_file_hash(found.path),
        "num_layers": cfg.prune.num_layers,
        "intermediate_size": cfg.prune.intermediate_size,
    }
    differ = {k: (record.get(k), v) for k, v in wanted.items() if record.get(k) != v}
    calibrate = record.get("calibration", {}).get("calibrate_norms")
    if calibrate != cfg.prune.calibrate_norms:
        differ["calibration.calibrate_norms"] = (calibrate, cfg.prune.calibrate_norms)
    if differ:
        listed = "; ".join(f"{k}: dir has {a!r}, this run {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"the pruned student in {out} was cut differently ({listed}); delete it, or set prune.dir to a new "
            "directory"
        )
    return out


@stops_cleanly
def run_prune(cfg: DistillConfig) -> Path:
    """``launch/prune.py``: the importance file (reused or scored), then the pruned student; returns its dir.

    The student's width is ``model.student_arch.hidden_size`` (the importance file's d_S units); nothing is
    written before the models, the pair and the data have been checked.
    """
    from flexkd_ds.jobs.common import (
        check_models,
        existing_importance,
        model_specs,
        setup_logging,
        teacher_engine,
        train_dataset,
    )
    from flexkd_ds.jobs.score import score_teacher, summarize, write_importance
    from flexkd_ds.runtime.dist import init_distributed

    if cfg.task != "causal_lm":
        raise ValueError(
            f"launch/prune.py cuts causal LMs; for task={cfg.task} run launch/distill.py with "
            "model.student_init=pruned: it cuts the student (written to prune.dir) before training"
        )
    if cfg.model.student is not None:
        raise ValueError(
            f"model.student={cfg.model.student!r} names a pretrained student; the prune job cuts one from the "
            "teacher: set model.student=null and model.student_arch={from_teacher: true, hidden_size: d_S}"
        )
    if not (cfg.model.student_arch or {}).get("from_teacher"):
        raise ValueError("the prune job needs model.student_arch.from_teacher=true and its hidden_size (d_S)")
    cfg = cfg.replace(**{"model.student_init": "pruned"})
    env = init_distributed()
    setup_logging(env)
    teacher, student, tokenizer = model_specs(cfg)
    check_prune_request(cfg, teacher.config, student.width)
    check_models(cfg.replace(**{"loss.feature_loss": "flexkd"}), teacher, student, tokenizer)
    found = existing_importance(cfg, teacher, student.width)
    engine = teacher_engine(cfg, teacher, env, cfg.importance.batch_size)
    dataset = train_dataset(cfg, tokenizer, env, engine=engine, teacher_name=teacher.name)
    if found is None:
        accumulator = score_teacher(cfg, engine, dataset, env, data.pad_token_id(tokenizer))
        found = write_importance(cfg, teacher, accumulator, student.width, env)
    if env.is_main:
        logger.info(summarize(found))
    out = prune_student(cfg, engine, teacher, tokenizer, dataset, env, data.pad_token_id(tokenizer), found)
    if env.is_main:
        logger.info("pruned student (Hugging Face format, %s inside): %s", PRUNE_FILE, out)
    return out
