"""The cache_teacher job: the teacher's LM-head input for every training example, written once as an exact
offline cache (``inputs/teacher_cache.py``), and the cached teacher that distill trains against.

Build (``launch/cache_teacher.py``, or distill when ``teacher_cache.dir`` holds no complete cache): the
teacher runs as its ZeRO-3 inference engine; example i goes to rank i % world (``sampling.shard_for_scoring``);
each rank writes its shards of ``teacher_cache.shard_examples`` examples. Every rank runs the same number of
forwards: a shard slot is recomputed on all ranks when any rank still needs it (a resumed build), and only the
ranks that need it write. After a barrier rank 0 writes the manifest and then the ``COMPLETE`` marker.

Use (distill with a complete, matching cache): only the teacher's LM head is resident. Teacher logits =
``head(h)``, Flex-KD targets = ``h``'s columns, importance = the closed form on cached ``h``: the same
functions of the same ``h`` as the live path, so an fp32 cache reproduces the live run.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexkd_ds import __version__
from flexkd_ds.inputs import data, models
from flexkd_ds.inputs import teacher_cache as store
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.common import (
    ModelSpec,
    model_specs,
    needs_teacher_responses,
    setup_logging,
    teacher_engine,
    train_dataset,
)
from flexkd_ds.jobs.score import teacher_head
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.dist import DistEnv, all_reduce_sum, barrier, init_distributed
from flexkd_ds.runtime.engines import HeadInput, deepspeed_dict, engine_dtype, head_skipped

logger = logging.getLogger("flexkd_ds")

# Tests only: seconds to sleep after each shard, so a build can be killed mid-way.
SHARD_DELAY_ENV = "FLEXKD_CACHE_SHARD_DELAY_S"


def refuse_live_only(cfg: DistillConfig, teacher: ModelSpec, *, training: bool = True) -> None:
    """Refuse the features that need the teacher's body, naming both ways out (``training=False``: only
    those that change what is cached)."""
    way_out = "drop teacher_cache.dir (train with the live teacher) or"
    if training and cfg.model.resolved_student_init == "pruned":
        raise ValueError(
            "teacher_cache.dir: model.student_init=pruned cuts the student from the teacher's body, which a "
            f"teacher cache does not hold; {way_out} set model.student_init=random (or model.student=<dir>)"
        )
    if needs_teacher_responses(cfg):
        raise ValueError(
            "teacher_cache.dir: data.responses=teacher makes the teacher generate the responses, which needs "
            f"its body; {way_out} set data.responses=dataset"
        )
    if training and needs_teacher_responses(cfg, valid=True):
        raise ValueError(
            "teacher_cache.dir: data.valid=builtin:prompts makes the teacher answer the held-out prompts, "
            f"which needs its body; {way_out} set data.valid=null (or a dataset with responses)"
        )
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(teacher.config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"teacher_cache.dir: {teacher.name} transforms its logits after the LM head ({name}), which "
                f"the cache does not reproduce; {way_out} use a teacher without {name}"
            )


def teacher_compute_dtype(cfg: DistillConfig, env: DistEnv) -> torch.dtype:
    """The dtype the teacher engine runs in (its DeepSpeed config + model.dtype)."""
    ds_dict = deepspeed_dict(
        cfg.deepspeed.teacher_config, micro_batch_size=1, grad_accum=1, world_size=env.world_size,
        dtype=cfg.model.dtype,
    )  # fmt: skip
    return engine_dtype(ds_dict)


def expected_fields(
    cfg: DistillConfig, teacher: ModelSpec, dataset, head_weight, head_bias, compute_dtype: torch.dtype
) -> dict:
    """The manifest fields this run needs (``teacher_cache.CHECKED_FIELDS`` and a few for humans)."""
    d = cfg.data
    return {
        "teacher": teacher.name,
        "head_sha256": store.tensors_sha256(head_weight, head_bias),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "tokenizer": cfg.model.tokenizer or teacher.name,
        "vocab_size": int(head_weight.shape[0]),
        "data_source": f"{d.train} split={d.train_split} max_train_rows={d.max_train_rows}",
        "prompt_style": d.prompt_style,
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
        "data_sha256": store.examples_sha256(dataset[i] for i in range(len(dataset))),
        "num_examples": len(dataset),
        "d_teacher": int(head_weight.shape[1]),
        "dtype": cfg.teacher_cache.dtype,
        "positions": "every non-pad token of each example (input_ids order)",
        "created_by": f"flexkd_ds {__version__}",
    }


def build_cache(cfg: DistillConfig, engine, fields: dict, dataset, env: DistEnv, pad_id: int) -> Path:
    """Write (or finish) the cache in ``teacher_cache.dir``; collective: every rank calls it."""
    directory = Path(cfg.teacher_cache.dir)
    if store.cache_state(directory) == "complete":
        store.TeacherCache.open(directory, fields, verify=False)  # refuses another run's cache
        logger.info("teacher cache %s is complete; nothing to build", directory)
        return directory
    if env.is_main and store.read_build_record(directory) is None:
        store.write_build_record(directory, fields)
    barrier()
    store.check_matches(directory, store.read_build_record(directory), fields, store.BUILD)

    batch_size = cfg.importance.batch_size
    per_rank = [
        sampling.shard_for_scoring(len(dataset), r, env.world_size, batch_size) for r in range(env.world_size)
    ]
    per_shard = max(1, cfg.teacher_cache.shard_examples // batch_size)  # batches per shard
    num_slots = math.ceil(len(per_rank[0]) / per_shard)

    def slot_batches(rank: int, slot: int) -> list[list[int | None]]:
        return per_rank[rank][slot * per_shard : (slot + 1) * per_shard]

    def slot_ids(rank: int, slot: int) -> list[int]:
        return [p for b in slot_batches(rank, slot) for p in b if p is not None]

    mine = [bool(slot_ids(env.rank, s)) for s in range(num_slots)]
    local_need = [
        mine[s] and not store.shard_done(directory, store.shard_name(env.rank, s), slot_ids(env.rank, s))
        for s in range(num_slots)
    ]
    need = all_reduce_sum(torch.tensor(local_need, dtype=torch.float32, device=env.device)).cpu()
    done_before = sum(m and not n for m, n in zip(mine, local_need, strict=True))
    if done_before:
        logger.info(
            "teacher cache %s: resuming, %d shard(s) of rank 0 already complete", directory, done_before
        )
    store_dtype = store.STORE_DTYPES[cfg.teacher_cache.dtype]
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    capture = HeadInput(engine.module)  # removed below: distill goes on with this engine freed
    start = time.perf_counter()
    slots = [s for s in range(num_slots) if need[s] > 0]
    total = sum(len(slot_batches(env.rank, slot)) for slot in slots)
    bar = tqdm(total=total, desc=f"teacher cache ({len(slots)} shard(s) per rank)", disable=not env.is_main,
               unit="batch")  # fmt: skip
    for slot in slots:
        hidden_by_id = {}
        for positions in slot_batches(env.rank, slot):
            examples = [None if p is None else dataset[p] for p in positions]
            batch = {k: v.to(env.device) for k, v in data.collate(examples, pad_id).items()}
            with torch.no_grad(), head_skipped(engine.module):  # the cache holds h: no (B, T, V) logits
                engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            hidden = capture.pop()  # (B, T, d_T)
            bar.update(1)
            for row, (p, example) in enumerate(zip(positions, examples, strict=True)):
                if p is not None:
                    hidden_by_id[p] = hidden[row, : len(example["input_ids"])].to("cpu", store_dtype).clone()
        if local_need[slot]:
            store.write_shard(directory, store.shard_name(env.rank, slot), hidden_by_id)
        if delay:
            time.sleep(delay)
    capture.remove()
    bar.close()
    barrier()
    if env.is_main:
        names = [
            store.shard_name(r, s) for r in range(env.world_size) for s in range(num_slots) if slot_ids(r, s)
        ]
        manifest = store.finalize(directory, fields, names)
        logger.info(
            "teacher cache %s: %d examples, %d tokens, %.1f MB in %d shards (%d built now over %d ranks in "
            "%.1f s)", directory, manifest["num_examples"], manifest["tokens"], manifest["bytes"] / 1e6,
            len(names), len(slots), env.world_size, time.perf_counter() - start,
        )  # fmt: skip
    barrier()
    return directory


class CachedTeacher:
    """The teacher as distill sees it with a cache: ``(example_ids, width[, rows]) -> (logits, hidden)`` with
    logits = ``head(hidden)``, hidden (B, width, d_T) right-padded with zeros (masked by every loss)."""

    def __init__(self, cache: store.TeacherCache, head: torch.nn.Module, dtype: torch.dtype, device) -> None:
        self.cache, self.head, self.dtype, self.device = cache, head, dtype, device

    def hidden(self, example_ids, width: int) -> torch.Tensor:
        return self.cache.batch_hidden(example_ids, width, dtype=self.dtype, device=self.device)

    def __call__(self, example_ids, width: int, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden); ``rows``: the logits at those positions only, (1, R, V); (R,) flat row-major
        indices or a (B, width) bool mask."""
        hidden = self.hidden(example_ids, width)
        with torch.no_grad():
            if rows is None:
                return self.head(hidden), hidden
            flat = hidden.reshape(-1, hidden.shape[-1])
            picked = flat[rows.reshape(-1)] if rows.dtype == torch.bool else flat.index_select(0, rows)
            return self.head(picked)[None], hidden

    def head_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.weight.detach(), getattr(self.head, "bias", None)


def head_only(teacher: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    """The teacher's LM head alone: read by itself from a safetensors checkpoint (``models.load_lm_head``);
    otherwise (GGUF, ``.bin``, a random teacher) the teacher is built or loaded on CPU and the rest dropped."""
    if teacher.source is not None:
        head = models.load_lm_head(teacher.source, teacher.config, dtype=dtype)
        if head is not None:
            return head
        logger.info(
            "%s: the head cannot be read alone (not safetensors); loading the teacher for it", teacher.name
        )
    model = teacher.load(dtype)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"teacher {teacher.name} has no LM head (output embeddings) to pair with a cache")
    head.requires_grad_(False)
    del model
    gc.collect()
    return head


def cached_teacher(
    cfg: DistillConfig, teacher: ModelSpec, dataset, env: DistEnv, pad_id: int
) -> CachedTeacher:
    """The cached teacher for distill: opens a complete matching cache, or builds (resumes) it first with the
    teacher's engine, which is freed before training. Refuses another run's cache or partial build."""
    compute_dtype = teacher_compute_dtype(cfg, env)
    head = head_only(teacher, compute_dtype)
    fields = expected_fields(cfg, teacher, dataset, head.weight, getattr(head, "bias", None), compute_dtype)
    directory = Path(cfg.teacher_cache.dir)
    state = store.cache_state(directory)
    if state == "incomplete":  # refuse another run's partial build before starting the teacher
        store.check_matches(directory, store.read_build_record(directory), fields, store.BUILD)
    if state != "complete":
        logger.info("teacher cache %s: %s; building it with the teacher first", directory, state)
        engine = teacher_engine(cfg, teacher, env, cfg.importance.batch_size)
        build_cache(cfg, engine, fields, dataset, env, pad_id)
        del engine
        gc.collect()
    cache = store.TeacherCache.open(directory, fields)
    logger.info(
        "teacher cache %s: %d examples, dtype %s; the teacher's body is not loaded",
        directory, len(cache), cache.manifest["dtype"],
    )  # fmt: skip
    return CachedTeacher(cache, head.to(env.device), compute_dtype, env.device)


def run_cache_teacher(cfg: DistillConfig) -> Path:
    """The cache_teacher job (``launch/cache_teacher.py``): build or finish ``teacher_cache.dir``."""
    if cfg.teacher_cache.dir is None:
        raise ValueError("cache_teacher needs teacher_cache.dir=DIR (where the cache is written)")
    env = init_distributed()
    setup_logging(env)
    teacher, _, tokenizer = model_specs(cfg)
    refuse_live_only(cfg, teacher, training=False)
    dataset = train_dataset(cfg, tokenizer, env)
    engine = teacher_engine(cfg, teacher, env, cfg.importance.batch_size)
    weight, bias = teacher_head(engine)
    fields = expected_fields(cfg, teacher, dataset, weight, bias, teacher_compute_dtype(cfg, env))
    return build_cache(cfg, engine, fields, dataset, env, data.pad_token_id(tokenizer))
