"""The ablate job (``launch/score.py --ablate / --stability``): do the scored units matter to the teacher?

Setup (the teacher whole on one device, the importance file of ``output_dir`` or a fresh score job), then the
measurements of ``flexkd_ds.evaluation.ablation`` (zeroed top / bottom / random units, selection stability),
then the report (``ablation.json``, ``ablation.md``).
"""

from __future__ import annotations

import logging
import os

import torch

from flexkd_ds.evaluation import ablation
from flexkd_ds.evaluation.metrics import eval_rows_from, instruction_rows, nll_batches
from flexkd_ds.inputs import data, models
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.common import existing_importance, model_specs, setup_logging, train_dataset
from flexkd_ds.jobs.score import feature_rows, run_score, scoring_order, summarize
from flexkd_ds.runtime.dist import DistEnv

logger = logging.getLogger("flexkd_ds")


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
        loaded = instruction_rows(eval_data, max_rows, label="--eval-data").rows
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
        dataset = train_dataset(cfg, tokenizer, env, engine=model, teacher_name=teacher.name)

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
