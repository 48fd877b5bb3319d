"""The evaluate job (``launch/evaluate.py``): several models x several test sets x decodings, one table.

Setup (the sets, each model on its device or as a ZeRO-3 inference engine with ``--zero3``), the loop (response
NLL on every row, generation and ROUGE-L per decoding and seed, each rank its share of the rows), the report
(``results.json``, ``results.md``, predictions as JSONL). The metrics are ``flexkd_ds.evaluation.metrics``.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexkd_ds.evaluation.generation import generate
from flexkd_ds.evaluation.metrics import (
    ROUGE_TYPE,
    ROUGE_USE_STEMMER,
    EvalRow,
    NLLResult,
    eval_rows_from,
    instruction_rows,
    mean_std,
    nll_batches,
    response_nll,
    rouge_l,
)
from flexkd_ds.inputs import data

logger = logging.getLogger("flexkd_ds")

# ------------------------------------------------------------------------------------------------ job

DECODINGS = {"greedy": ("greedy",), "sample": ("sample",), "both": ("greedy", "sample")}
METRICS = ("rouge", "nll")
TASKS = ("causal_lm", "classification", "seq2seq")
CLASSIFICATION_METRICS = ("accuracy", "f1_accuracy", "pearson_spearman")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # model / set names become file names


def parse_named(option: str, spec: str) -> tuple[str, str]:
    """``NAME=VALUE`` from ``--model`` / ``--data``; errors name the option and show the expected form."""
    name, sep, value = spec.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise ValueError(f"{option} expects NAME=SOURCE (e.g. {option} student=runs/x/student), got {spec!r}")
    if not _NAME.match(name):
        raise ValueError(
            f"{option} name {name!r} must be letters, digits, '.', '_', '+' or '-' (it names output files)"
        )
    return name, value


@dataclass(frozen=True)
class EvalOptions:
    """What ``launch/evaluate.py`` runs (its ``--help`` explains each option)."""

    models: tuple[tuple[str, str], ...]  # (name, source): HF dir, hub id, .gguf, smollm2-135m-instruct
    sets: tuple[tuple[str, str], ...]  # (name, path of a MiniLLM-layout JSONL file)
    out: Path
    decoding: str = "sample"
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    max_new_tokens: int = 256
    batch_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_style: str = "plain"
    max_rows: int | None = None
    max_prompt_length: int | None = None
    max_length: int = 1024  # NLL: prompt + response tokens (the prompt is left-truncated first)
    metrics: tuple[str, ...] = METRICS
    tokenizer: str | None = None  # override for every model (e.g. builtin:bytes); default: the model's own
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero3: bool = False
    ds_config: str = "ds_configs/teacher_zero3.json"
    progress: bool = True
    task: str = "causal_lm"  # classification | seq2seq: flexkd_ds.jobs.evaluate_task
    num_labels: int | None = None  # classification from a file: its classes (1: a regression score)
    metric: str | None = (
        None  # classification: accuracy | f1_accuracy | pearson_spearman (None: the preset's)
    )
    split: str | None = None  # a hub dataset's split (None: the preset's validation split, else "test")
    field_map: dict | None = None  # the task's column names -> the file's

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {list(TASKS)}, got {self.task!r}")
        if self.task != "causal_lm" and self.zero3:
            raise ValueError(f"--task {self.task} runs in one process: drop --zero3")
        if self.metric is not None and self.metric not in CLASSIFICATION_METRICS:
            raise ValueError(f"--metric must be one of {list(CLASSIFICATION_METRICS)}, got {self.metric!r}")
        for option, pairs in (("--model", self.models), ("--data", self.sets)):
            if not pairs:
                raise ValueError(f"give at least one {option} NAME=...")
            names = [name for name, _ in pairs]
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                raise ValueError(f"duplicate {option} names {dups}: each needs its own name")
        if self.decoding not in DECODINGS:
            raise ValueError(f"--decoding must be one of {sorted(DECODINGS)}, got {self.decoding!r}")
        if "sample" in DECODINGS[self.decoding] and not self.seeds:
            raise ValueError("--decoding sample needs at least one --seeds value")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has duplicates: {list(self.seeds)}")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"--metrics must be among {METRICS}, got {list(self.metrics)}")
        for option, value in (("--max-new-tokens", self.max_new_tokens), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"--max-rows must be >= 1, got {self.max_rows}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
        if self.prompt_style not in ("plain", "chat"):
            raise ValueError(f"--prompt-style must be plain or chat, got {self.prompt_style!r}")

    def runs(self) -> list[tuple[str, int | None]]:
        """(decoding, seed) pairs: greedy once (seed None), sampling once per seed."""
        return [(d, None) if d == "greedy" else (d, s) for d in DECODINGS[self.decoding]
                for s in ([None] if d == "greedy" else self.seeds)]  # fmt: skip


def prediction_path(out: str | Path, model: str, set_name: str, decoding: str, seed: int | None) -> Path:
    """``predictions/<model>/<set>.greedy.jsonl`` or ``predictions/<model>/<set>.sample.seed<k>.jsonl``."""
    stem = f"{set_name}.{decoding}" + ("" if seed is None else f".seed{seed}")
    return Path(out) / "predictions" / model / f"{stem}.jsonl"


def run_evaluate(opts: EvalOptions) -> dict | None:
    """Evaluate every model on every set; rank 0 writes ``results.json``, ``results.md`` and the predictions
    under ``opts.out`` and returns the results dict (other ranks return None).

    Inputs are checked before any model loads: every test file is read and validated, every model source
    resolved. ``zero3``: run under ``deepspeed``; each model is sharded as a ZeRO-3 inference engine, the
    prompts and NLL rows are split over ranks (padded so every rank calls generate / forward equally often).
    """

    if opts.task != "causal_lm":
        from flexkd_ds.jobs.evaluate_task import run_task_evaluate

        return run_task_evaluate(opts)
    sets = {name: instruction_rows(path, opts.max_rows, f"--data {name}") for name, path in opts.sets}
    sources = resolve_sources(opts)
    env = None
    if opts.zero3:
        from flexkd_ds.runtime.dist import init_distributed

        env = init_distributed()
    is_main = env is None or env.is_main
    if is_main:
        opts.out.mkdir(parents=True, exist_ok=True)
    else:
        logger.setLevel(logging.WARNING)
    results = {"protocol": _protocol(opts), "models": {},
               "sets": {n: {"path": str(p), "n": len(sets[n])} for n, p in opts.sets}}  # fmt: skip
    for name, source in sources.items():
        entry = _evaluate_model(opts, name, source, sets, env)
        if is_main:
            results["models"][name] = entry
    if not is_main:
        return None
    _write_json(opts.out / "results.json", results)
    (opts.out / "results.md").write_text(markdown_report(results))
    logger.info("wrote %s and %s", opts.out / "results.json", opts.out / "results.md")
    return results


def resolve_sources(opts: EvalOptions) -> dict:
    """``--model NAME=SOURCE`` -> resolved model sources; an error names the option."""
    from flexkd_ds.inputs import models

    sources = {}
    for name, text in opts.models:
        try:
            sources[name] = models.resolve_model_source(text)
        except (OSError, ValueError) as err:
            raise type(err)(f"--model {name}={text}: {err}") from err
    return sources


def _evaluate_model(opts: EvalOptions, name: str, source, sets: dict[str, data.LoadedRows], env) -> dict:
    """One model over every set: NLL and every (decoding, seed) run; the summary dict (rank 0)."""
    start, is_main = time.perf_counter(), env is None or env.is_main
    logger.info("model %s: %s", name, source)
    tokenizer = _tokenizer(opts, source)
    model, engine = _load_model(opts, source, env)
    entry: dict = {"source": dict(opts.models)[name], "rougeL": {}, "nll": {}}
    for set_name, loaded in sets.items():
        rows = eval_rows_from(loaded, tokenizer=tokenizer, prompt_style=opts.prompt_style)
        if "nll" in opts.metrics:
            nll = _split_nll(model, tokenizer, rows, opts, env)
            entry["nll"][set_name] = {"nll": nll.mean, "ppl": nll.ppl, "tokens": nll.tokens, "n": len(rows)}
            logger.info("  %s: response NLL %.4f nats/token, ppl %.3f", set_name, nll.mean, nll.ppl)
        for decoding, seed in opts.runs() if "rouge" in opts.metrics else ():
            predictions = _split_generate(model, tokenizer, rows, opts, env, decoding, seed)
            if is_main:
                score = _score_and_save(opts.out, name, set_name, decoding, seed, rows, predictions)
                runs = entry["rougeL"].setdefault(set_name, {})
                runs.setdefault(decoding, {"seeds": [], "per_seed": []})
                runs[decoding]["seeds"].append(seed)
                runs[decoding]["per_seed"].append(score)
                logger.info("  %s %s (seed %s): ROUGE-L %.2f", set_name, decoding, seed, score)
    del model, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _summarise(entry, {n: len(s) for n, s in sets.items()})
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _protocol(opts: EvalOptions) -> dict:
    return {
        "decoding": opts.decoding, "seeds": list(opts.seeds), "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature, "top_p": opts.top_p, "top_k": opts.top_k,
        "prompt_style": opts.prompt_style, "max_rows": opts.max_rows, "max_prompt_length": opts.max_prompt_length,
        "nll_max_length": opts.max_length, "metrics": list(opts.metrics), "zero3": opts.zero3,
        "rouge": f"rouge_score RougeScorer(['{ROUGE_TYPE}'], use_stemmer={ROUGE_USE_STEMMER}), F x 100, "
                 "best over references, mean over examples",
        "std": "population std (ddof 0) over seeds of the per-seed set means",
    }  # fmt: skip


def _tokenizer(opts: EvalOptions, source):
    from flexkd_ds.inputs import models
    from flexkd_ds.inputs.byte_tokenizer import BYTE_TOKENIZER_NAME, byte_tokenizer

    if opts.tokenizer == BYTE_TOKENIZER_NAME:
        return byte_tokenizer()
    return models.load_tokenizer(models.resolve_model_source(opts.tokenizer) if opts.tokenizer else source)


def _load_model(opts: EvalOptions, source, env):
    """(module to call, engine or None): a ZeRO-3 inference engine's module, or a plain model on the device."""
    from flexkd_ds.inputs import models

    if env is not None:
        from flexkd_ds.runtime import engines as engine

        ds_dict = engine.deepspeed_dict(opts.ds_config, micro_batch_size=opts.batch_size, grad_accum=1,
                                        world_size=env.world_size, dtype=opts.dtype)  # fmt: skip
        dtype = engine.engine_dtype(ds_dict)
        eng = engine.build_teacher_engine(lambda: models.load_causal_lm(source, dtype=dtype), ds_dict)
        return eng.module, eng
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = opts.dtype
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return models.load_causal_lm(source, dtype=dtype).to(device).eval(), None


def _my_share(n: int, env) -> tuple[list[int], int]:
    """(indices of this rank, slots every rank fills): rows rank, rank + world, ...; padded to equal length."""
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    return list(range(rank, n, world)), math.ceil(n / world)


def _split_nll(model, tokenizer, rows: Sequence[EvalRow], opts: EvalOptions, env) -> NLLResult:
    from flexkd_ds.inputs.models import max_positions

    mine, slots = _my_share(len(rows), env)
    max_length = min(opts.max_length, max_positions(model.config) or opts.max_length)
    batches = nll_batches([rows[i] for i in mine], tokenizer, max_length=max_length,
                          batch_size=opts.batch_size, num_batches=math.ceil(slots / opts.batch_size),
                          by_length=True)  # fmt: skip
    result = response_nll(model, batches)
    if env is None:
        return result
    from flexkd_ds.runtime.dist import all_reduce_sum

    total = all_reduce_sum(
        torch.tensor([result.nll_sum, result.tokens], dtype=torch.float64, device=env.device)
    )
    return NLLResult(float(total[0]), int(total[1]))


def _split_generate(model, tokenizer, rows, opts: EvalOptions, env, decoding: str, seed) -> list[str]:
    mine, slots = _my_share(len(rows), env)
    dummies = slots - len(mine)  # placeholder prompts: this rank must run as many batches as the others
    outputs = generate(
        model, tokenizer, [rows[i].prompt for i in mine] + [rows[0].prompt] * dummies,
        max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, do_sample=decoding == "sample",
        seed=seed, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
        max_prompt_length=opts.max_prompt_length, synced_gpus=env is not None and env.world_size > 1,
        progress=opts.progress and (env is None or env.is_main), indices=mine + [0] * dummies,
    )  # fmt: skip
    pairs = list(zip(mine, outputs, strict=False))  # drops the placeholders' outputs
    if env is not None:
        from flexkd_ds.runtime.dist import all_gather_objects

        pairs = [pair for part in all_gather_objects(pairs) for pair in part]
    predictions = [""] * len(rows)
    for index, text in pairs:
        predictions[index] = text
    return predictions


def _score_and_save(out, model: str, set_name: str, decoding: str, seed, rows, predictions) -> float:
    """ROUGE-L of one run; writes its predictions JSONL; returns the set mean."""
    scores = rouge_l(predictions, [row.references for row in rows])
    path = prediction_path(out, model, set_name, decoding, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row, prediction, score in zip(rows, predictions, scores, strict=True):
            record = {"source": row.source, "prompt": row.prompt, "references": list(row.references),
                      "prediction": prediction, "rougeL": score}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return math.fsum(scores) / len(scores)


def _summarise(entry: dict, sizes: dict[str, int]) -> None:
    """Add mean/std/n per (set, decoding) and the per-seed average over sets ("average")."""
    averages: dict = {}
    for set_name in sizes:
        for decoding, per in entry["rougeL"].get(set_name, {}).items():
            per["mean"], per["std"] = mean_std(per["per_seed"])
            per["n"] = sizes[set_name]
            averages.setdefault(decoding, []).append(per["per_seed"])
    entry["average"] = {}
    for decoding, columns in averages.items():
        per_seed = [math.fsum(values) / len(values) for values in zip(*columns, strict=True)]
        mean, std = mean_std(per_seed)
        entry["average"][decoding] = {"mean": mean, "std": std, "per_seed": per_seed}


def markdown_report(results: dict) -> str:
    """One ROUGE-L table per decoding (rows = models, columns = sets + average, "mean ± std") and one
    response-NLL table (nats/token, perplexity in brackets)."""
    sets = list(results["sets"])
    proto = results["protocol"]
    lines = ["# Evaluation results", ""]
    header = "| Model | " + " | ".join(f"{s} (n={results['sets'][s]['n']})" for s in sets)
    for decoding in DECODINGS[proto["decoding"]] if "rouge" in proto["metrics"] else ():
        seeds = ", ".join(map(str, proto["seeds"]))
        how = "greedy, one run" if decoding == "greedy" else f"sampled, mean ± std over seeds {seeds}"
        lines += [f"## ROUGE-L ({how})", "", header + " | Average |",
                  "|---" * (len(sets) + 2) + "|"]  # fmt: skip
        for model, entry in results["models"].items():
            cells = [_pm(entry["rougeL"][s][decoding]) for s in sets] + [_pm(entry["average"][decoding])]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    if "nll" in proto["metrics"]:
        lines += ["## Response NLL (nats/token; perplexity)", "", header + " |", "|---" * (len(sets) + 1) + "|"]  # fmt: skip
        for model, entry in results["models"].items():
            cells = [f"{entry['nll'][s]['nll']:.4f} ({entry['nll'][s]['ppl']:.2f})" for s in sets]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"ROUGE-L: {proto['rouge']}; std: {proto['std']}.")
    return "\n".join(lines) + "\n"


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
