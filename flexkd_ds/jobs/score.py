"""The scoring job: function-tangent importance of the teacher's last hidden units over the task data,
sharded over all ranks, reduced exactly, written as ``importance.safetensors`` (DESIGN.md "Artifacts")."""

from __future__ import annotations

import logging
import os
import time

import torch
from tqdm.auto import tqdm

from flexkd_ds.inputs import data, models
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs import ablate as ablation
from flexkd_ds.jobs.common import ModelSpec, importance_metadata
from flexkd_ds.method import importance
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.dist import DistEnv, all_reduce_sum, barrier
from flexkd_ds.runtime.engines import HeadInput, gathered

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
    icfg = cfg.importance
    order = scoring_order(cfg, len(dataset))
    num_examples = len(order)
    batches = sampling.shard_for_scoring(num_examples, env.rank, env.world_size, icfg.batch_size)
    weight, bias = teacher_head(engine)
    weight, bias = weight.to(env.device), None if bias is None else bias.to(env.device)
    capture = HeadInput(engine.module)
    accumulator = importance.ImportanceAccumulator(weight.shape[1])
    start = time.perf_counter()
    bar = tqdm(batches, desc="importance", disable=not env.is_main, unit="batch")
    for batch_positions in bar:
        examples = [None if p is None else dataset[order[p]] for p in batch_positions]
        batch = {k: v.to(env.device) for k, v in data.collate(examples, pad_id).items()}
        rows = feature_rows(batch, cfg.loss.feature_tokens)
        rows &= torch.tensor([p is not None for p in batch_positions], device=env.device)[:, None]
        with torch.no_grad():
            engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        scores, rows = importance.batch_tangent_scores(
            capture.pop(), weight, batch, rows, functional=icfg.functional, head_bias=bias,
            chunk_tokens=icfg.chunk_tokens,
        )  # fmt: skip
        accumulator.update(scores, rows.sum(1))
    state = accumulator.state_tensor().to(env.device)
    accumulator.load_state_tensor(all_reduce_sum(state).cpu())
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
    """Select the top-d_S units, write the file on rank 0 (atomically), return it on every rank."""
    scores = accumulator.scores()
    indices = importance.select_units(scores, d_student)
    tail = importance.tail_mass(scores, d_student)
    path = cfg.importance.resolved_path(cfg.output_dir)
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
    dataset = train_dataset(cfg, tokenizer, env)
    engine = teacher_engine(cfg, teacher, env, cfg.importance.batch_size)
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


def _example_batches(dataset, positions: list[int], pad_id: int, batch_size: int, device) -> list[dict]:
    """Collated batches of ``dataset[p]`` for ``positions``, in order, on ``device``."""
    return [
        {k: v.to(device) for k, v in data.collate([dataset[p] for p in chunk], pad_id).items()}
        for chunk in (positions[i : i + batch_size] for i in range(0, len(positions), batch_size))
    ]


def run_ablate(
    cfg: DistillConfig,
    *,
    ablate: bool = True,
    percents=ablation.DEFAULT_PERCENTS,
    random_draws: int = 3,
    eval_data: str | None = None,
    max_rows: int | None = None,
    stability: bool = False,
    subsets: int = 3,
    options: list[str] | None = None,
) -> tuple[ablation.AblationResult | None, ablation.StabilityResult | None]:
    """``launch/score.py --ablate / --stability``: one process, the whole teacher on one device.

    Ablation uses ``<output_dir>``'s importance file (refused if made for another teacher or width; computed
    first through ``run_score`` when absent) and evaluates on ``eval_data`` (a MiniLLM-layout file, first
    ``max_rows`` rows) or, without it, on up to ``max_rows`` (default 64) training examples the importance
    pass did not score. Stability scores the ``importance.num_examples`` scored examples one by one and splits
    them into ``subsets`` disjoint parts. Writes ``ablation.json`` and ``ablation.md`` in ``output_dir``.

    A classification ``eval_data`` (an ``options`` column, or ``options`` given for every row) adds the
    accuracy of the best-scoring option to every setting (``ablation.choice_set``).
    """
    from flexkd_ds.jobs.common import existing_importance, model_specs, setup_logging, train_dataset
    from flexkd_ds.jobs.evaluate import _instruction_rows, eval_rows_from, nll_batches

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "--ablate / --stability run in a single process with the whole teacher on one device; start "
            "them with plain `python launch/score.py ...` (score a large teacher with deepspeed first)"
        )
    if not (ablate or stability):
        raise ValueError("nothing to do: pass --ablate, --stability or both")
    percents = ablation.check_percents(percents)
    if stability and (subsets < 2 or 0 < cfg.importance.num_examples < subsets):
        raise ValueError(
            f"stability needs --subsets >= 2 and importance.num_examples >= subsets; got --subsets {subsets} "
            f"and importance.num_examples={cfg.importance.num_examples}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = DistEnv(0, 1, 0, device)
    setup_logging(env)
    teacher, student, tokenizer = model_specs(cfg)
    if options is not None and eval_data is None:
        raise ValueError("--options names the answers of --eval-data rows; pass --eval-data PATH too")
    rows = choices = None  # the evaluation file is checked before anything heavy runs
    if ablate and eval_data is not None:
        loaded = _instruction_rows(eval_data, max_rows, label="--eval-data").rows
        rows = eval_rows_from(loaded, tokenizer=tokenizer, prompt_style=cfg.data.prompt_style)
        if not rows:
            raise ValueError(f"--eval-data {eval_data} has no rows; pass a file with test examples")
        if options is not None or any("options" in row.meta for row in loaded):
            choices = ablation.choice_set(
                loaded, tokenizer, max_length=cfg.data.max_length, batch_size=cfg.importance.batch_size,
                prompt_style=cfg.data.prompt_style, shared_options=options,
            )  # fmt: skip
    found = None
    if ablate:
        found = existing_importance(cfg, teacher, student.width)
        if found is None:
            logger.info("no matching importance file in %s: scoring the teacher first", cfg.output_dir)
            found = run_score(cfg)
        else:
            logger.info("reusing %s\n%s", found.path, summarize(found))
    pad_id = data.pad_token_id(tokenizer)
    dtype = models.resolve_dtype(cfg.model.precision(device.type))
    model = teacher.load(dtype).to(device)
    dataset = None
    if stability or (ablate and eval_data is None):
        dataset = train_dataset(cfg, tokenizer, env)

    result = None
    if ablate:
        if rows is not None:
            batch_iter = nll_batches(
                rows, tokenizer, max_length=cfg.data.max_length, batch_size=cfg.importance.batch_size
            )
            batches, where = list(batch_iter), f"{eval_data} ({len(rows)} rows)"
        else:
            held_out = scoring_order(cfg, len(dataset), held_out=True)[: max_rows or 64]
            if not held_out:
                raise ValueError(
                    f"every one of the {len(dataset)} training examples was scored (importance.num_examples); "
                    "pass --eval-data PATH for the ablation"
                )
            batches = _example_batches(dataset, held_out, pad_id, cfg.importance.batch_size, device)
            where = f"{len(held_out)} held-out examples of {cfg.data.train}"
        logger.info("ablation on %s, percents %s, %d random draws", where, list(percents), random_draws)
        result = ablation.run_ablation(
            model, found, batches, percents=percents, random_draws=random_draws, seed=cfg.seed,
            teacher=teacher.name, choices=choices,
        )  # fmt: skip
        result.info = {"teacher": teacher.name, "importance": found.path, "eval_data": where,
                       "dtype": str(dtype), "device": str(device)}  # fmt: skip

    stable = None
    if stability:
        positions = scoring_order(cfg, len(dataset))
        batches = _example_batches(dataset, positions, pad_id, cfg.importance.batch_size, device)
        per_example = ablation.example_tangent_scores(
            model,
            batches,
            functional=cfg.importance.functional,
            row_mask=lambda batch: feature_rows(batch, cfg.loss.feature_tokens),
            chunk_tokens=cfg.importance.chunk_tokens,
        )
        stable = ablation.selection_stability(per_example, student.width, subsets=subsets, seed=cfg.seed)

    json_path, md_path = ablation.write_report(cfg.output_dir, result, stable)
    logger.info("\n%s", md_path.read_text())
    logger.info("wrote %s and %s", json_path, md_path)
    return result, stable
