"""The scoring job: function-tangent importance of the teacher's last hidden units over the task data,
sharded over all ranks, reduced exactly, written as ``importance.safetensors`` (DESIGN.md "Artifacts")."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexkd_ds.inputs import data
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.common import ModelSpec, importance_metadata
from flexkd_ds.method import importance
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.dist import DistEnv, all_gather_objects, all_reduce_sum, barrier
from flexkd_ds.runtime.engines import HeadInput, gathered, head_skipped
from flexkd_ds.runtime.preemption import Preempted, Preemption, stops_cleanly

logger = logging.getLogger("flexkd_ds")


def teacher_head(engine) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A full, read-only copy of the teacher's LM head (V, d_T) and bias, gathered under ZeRO-3."""
    head = engine.module.get_output_embeddings()
    params = list(head.parameters())
    with gathered(params):
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None
    return weight, bias


def feature_rows(batch: dict[str, torch.Tensor], feature_tokens: str) -> torch.Tensor:
    """(B, T) bool: the rows Flex-KD scores and correlates: every attended token, or response tokens only."""
    if feature_tokens == "response":
        return batch["loss_mask"]
    return batch["attention_mask"].bool()


def scoring_order(cfg: DistillConfig, dataset_size: int, *, held_out: bool = False) -> list[int]:
    """The dataset positions the importance pass scores: a fixed, seeded subset of ``importance.num_examples``
    (the same whatever the world size). ``held_out=True``: the other positions, in the same seeded order."""
    wanted = cfg.importance.num_examples
    num_examples = dataset_size if wanted < 0 else min(wanted, dataset_size)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return order[num_examples:] if held_out else order[:num_examples]


def score_teacher(
    cfg: DistillConfig,
    engine,
    dataset: data.InstructionDataset,
    env: DistEnv,
    pad_id: int,
) -> importance.ImportanceAccumulator:
    """Per-example tangent scores of ``importance.num_examples`` training examples, summed over all ranks.

    Every rank runs the same number of teacher forwards (the last batches are padded with placeholder
    examples whose rows are all masked and which the accumulator skips), as ZeRO-3 requires.
    """
    weight, bias = teacher_head(engine)
    with HeadInput(engine.module) as capture:  # removed after scoring: the teacher keeps no hook

        def hidden_of(batch, positions):
            # the closed form reads the LM-head input only: the head is skipped, no (B, T, V) logits
            with torch.no_grad(), head_skipped(engine.module):
                engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return capture.pop()

        return score_hidden(cfg, dataset, env, pad_id, weight, bias, hidden_of)


# Tests only: a rank sends itself SIGTERM before scoring this batch index (the real handler then runs).
SIGNAL_AT_BATCH_ENV = "FLEXKD_SCORE_SIGNAL_AT_BATCH"


def partial_path(cfg: DistillConfig, rank: int) -> Path:
    """Where a stopped importance pass keeps this rank's partial sums (always inside output_dir)."""
    return Path(cfg.output_dir) / "importance.partial" / f"rank{rank}.pt"


def _partial_key(cfg: DistillConfig, env: DistEnv, num_examples: int, d_teacher: int) -> dict:
    i = cfg.importance
    return {"data": cfg.data.train, "seed": cfg.seed, "num_examples": num_examples, "batch_size": i.batch_size,
            "functional": i.functional, "feature_tokens": cfg.loss.feature_tokens, "world_size": env.world_size,
            "d_teacher": d_teacher, "teacher": cfg.model.teacher or str(cfg.model.teacher_arch)}  # fmt: skip


def _resume_point(cfg, env: DistEnv, key: dict, accumulator) -> int:
    """The batch index a stopped pass continues from (0: none, or not every rank has its matching sums)."""
    path = partial_path(cfg, env.rank)
    saved = torch.load(path, weights_only=False) if path.is_file() else None
    start = saved["next"] if saved is not None and saved["key"] == key else -1
    starts = all_gather_objects(start) if env.world_size > 1 else [start]
    if min(starts) < 0 or len(set(starts)) != 1:
        return 0
    accumulator.load_state_tensor(saved["state"])
    logger.info("importance: resuming a stopped pass at batch %d (partial sums in %s)", start, path.parent)
    return start


def score_hidden(cfg, dataset, env: DistEnv, pad_id: int, weight, bias, hidden_of):
    """The importance pass over ``hidden_of(batch, example_ids) -> (B, T, d_T)`` LM-head inputs: the live
    teacher's (``score_teacher``) or a teacher cache's (``jobs.cache_teacher``); the head is (weight, bias).

    On a preemption signal (``runtime.preemption``) all ranks agree at the next batch, save their partial sums
    to ``<output_dir>/importance.partial/`` and raise ``Preempted``; the rerun continues from there and ends
    with the sums an uninterrupted pass gives (the same batches, added in the same order)."""
    icfg = cfg.importance
    order = scoring_order(cfg, len(dataset))
    num_examples = len(order)
    batches = sampling.shard_for_scoring(num_examples, env.rank, env.world_size, icfg.batch_size)
    # upcast once for the whole pass (tangent_scores computes in float32, float64 for float64 input)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.to(env.device, acc)
    bias = None if bias is None else bias.to(env.device, acc)
    accumulator = importance.ImportanceAccumulator(weight.shape[1])
    key = _partial_key(cfg, env, num_examples, weight.shape[1])
    first = _resume_point(cfg, env, key, accumulator)
    preemption = Preemption.current()
    signal_at = int(os.environ.get(SIGNAL_AT_BATCH_ENV, "-1") or -1)
    start = time.perf_counter()
    bar = tqdm(batches, desc="importance", disable=not env.is_main, unit="batch", initial=first)
    for index, batch_positions in enumerate(batches):
        if index < first:
            continue
        if index == signal_at and env.rank == env.world_size - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if preemption is not None and preemption.agreed(env.device):
            path = partial_path(cfg, env.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "next": index, "state": accumulator.state_tensor()}, path)
            barrier()
            raise Preempted(
                f"preemption signal: the importance pass stopped after {index} of {len(batches)} batches per "
                f"rank; its partial sums are in {path.parent}: rerun the same command to continue"
            )
        example_ids = [None if p is None else order[p] for p in batch_positions]
        examples = [None if i is None else dataset[i] for i in example_ids]
        batch = {k: v.to(env.device) for k, v in data.collate(examples, pad_id).items()}
        rows = feature_rows(batch, cfg.loss.feature_tokens)
        rows &= torch.tensor([p is not None for p in batch_positions], device=env.device)[:, None]
        hidden = hidden_of(batch, example_ids)
        scores, rows = importance.batch_tangent_scores(
            hidden, weight, batch, rows, functional=icfg.functional, head_bias=bias,
            chunk_tokens=icfg.chunk_tokens,
        )  # fmt: skip
        accumulator.update(scores, rows.sum(1))
        bar.update(1)
    bar.close()
    state = accumulator.state_tensor().to(env.device)
    accumulator.load_state_tensor(all_reduce_sum(state).cpu())
    barrier()
    if env.is_main:
        shutil.rmtree(partial_path(cfg, 0).parent, ignore_errors=True)  # used up
    logger.info(
        "importance: %d examples, %d tokens over %d ranks in %.1f s",
        accumulator.num_examples,
        accumulator.num_tokens,
        env.world_size,
        time.perf_counter() - start,
    )
    return accumulator


def write_importance(
    cfg: DistillConfig, teacher: ModelSpec, accumulator, d_student: int, env: DistEnv
) -> importance.ImportanceFile:
    """Select the top-d_S units, write ``<output_dir>/importance.safetensors`` on rank 0 (atomically; never
    the file ``importance.path`` names, which is an input), return it on every rank."""
    scores = accumulator.scores()
    indices = importance.select_units(scores, d_student)
    tail = importance.tail_mass(scores, d_student)
    path = Path(cfg.output_dir) / "importance.safetensors"  # a job writes only inside its own output_dir
    given = cfg.importance.resolved_path(cfg.output_dir)
    if env.is_main and given.resolve() != path.resolve():
        logger.info("importance.path=%s is an input, left as it is: the new scores go to %s", given, path)
    metadata = importance_metadata(cfg, teacher, accumulator, tail)
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        importance.save_importance(path, scores, indices, metadata)
    barrier()
    return importance.load_importance(path)


def summarize(found: importance.ImportanceFile, top: int = 10) -> str:
    """A short human summary: top units, tail mass at d_S, score spread."""
    scores, indices = found.scores, found.indices
    d_student = indices.numel()
    head = ", ".join(f"{int(i)}:{float(scores[i]):.3g}" for i in indices[:top])
    ratio = float(scores.max() / scores.clamp_min(1e-30).min())
    return (
        f"importance ({found.metadata.get('functional')}, {found.metadata.get('num_examples')} examples, "
        f"{found.metadata.get('num_tokens')} tokens): keep d_S={d_student} of d_T={scores.numel()} units, "
        f"tail mass at d_S = {importance.tail_mass(scores, d_student):.4f}, max/min score = {ratio:.3g}\n"
        f"  top units (unit:score): {head}"
    )


@stops_cleanly
def run_score(cfg: DistillConfig, compare: str | None = None) -> importance.ImportanceFile:
    """The scoring job (``launch/score.py``): importance file for ``cfg``'s teacher and student width."""
    from flexkd_ds.jobs.common import model_specs, setup_logging, teacher_engine, train_dataset
    from flexkd_ds.runtime.dist import init_distributed

    env = init_distributed()
    setup_logging(env)
    teacher, student, tokenizer = model_specs(cfg)
    if student.width >= teacher.width:
        raise ValueError(
            f"Flex-KD selects d_S of the teacher's d_T units; the student width d_S={student.width} must be "
            f"smaller than the teacher's d_T={teacher.width} ({student.name} vs {teacher.name})"
        )
    engine = teacher_engine(cfg, teacher, env, cfg.importance.batch_size)
    dataset = train_dataset(cfg, tokenizer, env, engine=engine, teacher_name=teacher.name)
    accumulator = score_teacher(cfg, engine, dataset, env, data.pad_token_id(tokenizer))
    found = write_importance(cfg, teacher, accumulator, student.width, env)
    if env.is_main:
        logger.info(summarize(found))
        logger.info("importance file: %s", found.path)
        if compare is not None:
            other = importance.load_importance(compare)
            k = min(other.indices.numel(), found.indices.numel())
            overlap = importance.selection_overlap(found.indices[:k], other.indices[:k])
            logger.info("overlap of the top-%d units with %s: %.1f%%", k, compare, 100 * overlap)
    return found
