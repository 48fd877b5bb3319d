#!/usr/bin/env python
"""Evaluate models on instruction test sets (MiniLLM / Flex-KD protocol): ROUGE-L of generated responses
(greedy and/or sampled over several seeds) and response NLL / perplexity. Several models give one table.

  python launch/evaluate.py --model student=runs/tiny/student --model teacher=smollm2-135m-instruct \\
      --data dolly=../shared/data/instruct/dolly_valid.jsonl --out runs/eval --decoding both
  deepspeed --num_gpus 8 launch/evaluate.py --zero3 --model big=org/model-7b --data dolly=... --out runs/eval

Writes OUT/results.json (per model, set and decoding: mean, std and per-seed values; NLL and perplexity),
OUT/results.md (rows = models, columns = sets + average, "mean ± std") and
OUT/predictions/<model>/<set>.<decoding>[.seed<k>].jsonl (prompt, references, prediction, rougeL).
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flexkd_ds.jobs.evaluate import (
    CLASSIFICATION_METRICS,
    METRICS,
    TASKS,
    EvalOptions,
    parse_named,
    run_evaluate,
)
from flexkd_ds.runtime.dist import shutdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=SOURCE",
        help="a model to evaluate (repeat for several): NAME labels its row and files; SOURCE is a "
        "Hugging Face directory (e.g. a distill run's <output_dir>/student), a hub id, a .gguf "
        "file or smollm2-135m-instruct",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SET=PATH",
        help="a test set in MiniLLM JSONL layout (prompt or instruction[+input], output: a string or a "
        "list of references); repeat for several",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument(
        "--decoding",
        choices=("greedy", "sample", "both"),
        default="sample",
        help="greedy (one run), sample (one run per seed; the paper's protocol) or both",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[10, 20, 30, 40, 50],
        help="sampling seeds (default: 10 20 30 40 50, five as in the paper)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate / NLL batch (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument(
        "--prompt-style",
        choices=("plain", "chat"),
        default="plain",
        help="plain: the row's MiniLLM/Alpaca prompt; chat: the tokenizer's chat template",
    )
    p.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows of each set")
    p.add_argument(
        "--max-prompt-length",
        type=int,
        default=None,
        help="keep only the last N prompt tokens when generating (default: whole prompt)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="NLL: prompt + response token limit; the prompt is left-truncated first (default 1024)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=list(METRICS),
        help="rouge (generation) and/or nll (cheap, deterministic)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for every model (a source, or builtin:bytes); default: each model's own",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="weights dtype; auto = bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--zero3",
        action="store_true",
        help="shard each model as a ZeRO-3 inference engine over the ranks (launch with deepspeed)",
    )
    p.add_argument(
        "--ds-config",
        default="ds_configs/teacher_zero3.json",
        help="DeepSpeed config for --zero3 (stage 3; default ds_configs/teacher_zero3.json)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    task = p.add_argument_group(
        "task models (--task classification | seq2seq)",
        "score task=classification / task=seq2seq students (or any checkpoint of those classes) on the paper's "
        "metrics: --data NAME=SOURCE is then a preset (glue:sst2|mrpc|stsb|rte|mnli, imdb; cnn_dailymail, xsum), "
        "builtin:classification / builtin:seq2seq, or a file; writes OUT/results.json and OUT/results.md",
    )
    task.add_argument(
        "--task",
        choices=TASKS,
        default="causal_lm",
        help="what the models are (default causal_lm: instruction following)",
    )
    task.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="classification from a file: its number of classes (1: a regression score)",
    )
    task.add_argument(
        "--metric",
        choices=CLASSIFICATION_METRICS,
        default=None,
        help="classification: the reported metric (default: the preset's, else accuracy)",
    )
    task.add_argument(
        "--split",
        default=None,
        help="the split of a hub dataset (default: the preset's validation split, else test)",
    )
    task.add_argument("--field-map", default=None, metavar="TASK=COLUMN[,...]",
                      help="the file's columns for text, text_pair, label (classification) or text, target "
                      "(seq2seq), e.g. text=sentence,label=gold")  # fmt: skip
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    return p  # fmt: skip


def parse_field_map(text: str | None) -> dict | None:
    """``text=sentence,label=gold`` -> {"text": "sentence", "label": "gold"}."""
    if not text:
        return None
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise ValueError(f"--field-map must be TASK=COLUMN pairs separated by commas; got {text!r}")
    return {key.strip(): column.strip() for key, column in pairs}


def options_from_args(argv=None) -> EvalOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return EvalOptions(
            models=tuple(parse_named("--model", spec) for spec in args.model),
            sets=tuple(parse_named("--data", spec) for spec in args.data),
            out=args.out, decoding=args.decoding, seeds=tuple(args.seeds), max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            prompt_style=args.prompt_style, max_rows=args.max_rows, max_prompt_length=args.max_prompt_length,
            max_length=args.max_length, metrics=tuple(dict.fromkeys(args.metrics)), tokenizer=args.tokenizer,
            dtype=args.dtype, zero3=args.zero3, ds_config=args.ds_config, progress=not args.no_progress,
            task=args.task, num_labels=args.num_labels, metric=args.metric, split=args.split,
            field_map=parse_field_map(args.field_map),
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))


def main(argv=None) -> None:
    opts = options_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="[flexkd eval] %(message)s", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_evaluate(opts)
    except (OSError, ValueError, ImportError) as err:  # bad inputs: one clear line, no traceback
        logging.getLogger("flexkd_ds").error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    shutdown()  # every rank finished: destroy the process group (see flexkd_ds.runtime.dist.shutdown)


if __name__ == "__main__":
    main()
