"""Does the channel selection matter for a student pruned from the teacher? Three selections, one width.

    python bench/pruning_selection.py --out runs/pruning_selection      # defaults: 3 seeds, width 432

Smoke run (about two minutes on a CPU):

    python bench/pruning_selection.py --seeds 1 --heal-steps 2 --eval-rows 8 --score-examples 8 --batch 2 \
        --out runs/pruning_selection_smoke

Question: ``flexkd_ds.method.prune`` cuts a d_S-wide student out of the teacher by keeping d_S of its d_T
residual channels (``PrunePlan.units``). Flex-KD picks them by function-tangent importance; is that better than
Minitron's activation magnitude, or than chance? Every student below has the same width and depth, is cut by
the same code (``collect_prune_statistics`` -> ``make_plan(calibrate_norms=True)`` -> ``prune_model``, all
layers and MLP neurons kept unless ``--num-layers`` / ``--intermediate-size``); only the units differ:

    flexkd     top-d_S of G = mean over scoring examples of mean_t |dF/dh_t| (``importance.batch_tangent_scores``,
               F = sum_logprobs, h = the LM-head input, every non-pad token), in rank order
    magnitude  top-d_S of the mean |h| of each channel over the scoring tokens and over the L + 1 states of
               ``output_hidden_states`` (the residual stream entering each of the L layers, and the LM-head
               input), in rank order: Minitron's activation ranking of the embedding channels (Minitron reads
               the LayerNorm outputs; this reads the residual stream itself)
    random     d_S channels drawn uniformly (seeded by the seed), in random order

A seed draws, from one permutation of ``--train``, ``--score-examples`` scoring examples (importance, magnitude
and the prune statistics: block importance, MLP magnitudes, norm ratios) and then the healing batches; the
three selections of a seed share both. Measured: response NLL (nats/token, ``metrics.response_nll``) on the
first ``--eval-rows`` rows of ``--valid``, zero-shot (right after the cut) and after a short heal of
``--heal-steps`` AdamW steps (cosine to 0, clip 1.0) on LM loss + reverse KL to the teacher's logits
(``losses.lm_loss`` + ``losses.logit_divergence(kind=--logit)``, forward KL by default as in the quickstart,
weight 1 each, response tokens). The teacher's
LM-head input on the healing batches is computed once per seed and kept; its logits are ``lm_head`` of it.

Runs are cached as JSON under ``--out/runs/<selection>_seed<k>.json`` (an interrupted benchmark resumes; a run
cached with other settings runs again). Writes ``--out/results.json`` and ``--out/results.md``: selection |
zero-shot NLL | healed NLL (mean ± std over seeds) | per-seed values, the teacher's NLL on the same rows and the
overlap of the flexkd and magnitude selections (``importance.selection_overlap``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexkd_ds.evaluation import metrics as evaluate
from flexkd_ds.inputs import data, models
from flexkd_ds.method import importance, losses, prune

SELECTIONS = ("flexkd", "magnitude", "random")
# What makes two runs of one selection and seed the same run (a cached run with other values is run again).
RUN_KEYS = ("teacher", "train", "valid", "train_rows", "width", "num_layers", "intermediate_size",
            "score_examples", "eval_rows", "heal_steps", "batch", "lr", "max_length", "logit")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", default="../shared/data/instruct/dolly_dev.jsonl",
                   help="MiniLLM-layout JSONL: scoring examples and healing batches")  # fmt: skip
    p.add_argument("--valid", default="../shared/data/instruct/dolly_valid.jsonl",
                   help="MiniLLM-layout JSONL: the response NLL is measured on its first --eval-rows rows")  # fmt: skip
    p.add_argument("--out", default="runs/pruning_selection", help="output dir (runs are cached and resumed)")
    p.add_argument(
        "--teacher", default="smollm2-135m-instruct", help="dir, hub name, .gguf or smollm2-135m-instruct"
    )
    p.add_argument(
        "--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS, help="which to run"
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3], help="scoring rows, data order, random units"
    )
    p.add_argument("--logit", default="fkl", choices=("fkl", "rkl"), help="logit divergence of the heal")
    p.add_argument("--width", type=int, default=432,
                   help="d_S, kept residual channels (< d_T = 576; LLaMA: a multiple of its 9 heads)")  # fmt: skip
    p.add_argument("--num-layers", type=int, default=None, help="layers kept (make_plan; default: all)")
    p.add_argument(
        "--intermediate-size", type=int, default=None, help="MLP neurons kept per layer (default: all)"
    )
    p.add_argument("--train-rows", type=int, default=None, help="first N rows of --train (default: all)")
    p.add_argument("--score-examples", type=int, default=64,
                   help="training examples per seed for importance, magnitude and prune statistics")  # fmt: skip
    p.add_argument("--eval-rows", type=int, default=64, help="first N rows of --valid for the NLL")
    p.add_argument("--heal-steps", type=int, default=20, help="AdamW steps of the heal (0: zero-shot only)")
    p.add_argument("--batch", type=int, default=8, help="examples per heal step (also scoring / eval batch)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, cosine to 0, no warmup")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (training and eval)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default when present) or cpu",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- teacher side


def load_teacher(source: str, device: str):
    """The frozen fp32 teacher (a GGUF is de-quantised) and its tokenizer (pad = EOS when it has none)."""
    src = models.resolve_model_source(source)
    teacher = models.load_causal_lm(src, dtype=torch.float32).to(device).eval().requires_grad_(False)
    tokenizer = models.load_tokenizer(src)
    models.ensure_pad_token(tokenizer)
    return teacher, tokenizer


def base_model(model):
    """The model without its LM head (LLaMA ``model``, OPT ``model.decoder``, GPT-2 ``transformer``): its
    ``last_hidden_state`` is the LM-head input."""
    return model.get_submodule(prune.FAMILIES[prune.teacher_shapes(model.config).family].root)


def head_input(model, batch) -> torch.Tensor:
    """(B, T, d) the LM-head input (post final norm)."""
    return base_model(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state


def make_batches(dataset, positions: list[int], size: int, pad_id: int, device) -> list[dict]:
    return [
        {
            k: v.to(device)
            for k, v in data.collate([dataset[i] for i in positions[s : s + size]], pad_id).items()
        }
        for s in range(0, len(positions), size)
    ]


@torch.no_grad()
def channel_scores(teacher, batches: list[dict]) -> dict[str, torch.Tensor]:
    """(d_T,) Flex-KD importance G and mean |h| over the scoring tokens and all hidden states (module doc)."""
    weight, bias = models.head_weight_and_bias(teacher)
    acc = importance.ImportanceAccumulator(weight.shape[1])
    magnitude, tokens = torch.zeros(weight.shape[1], dtype=torch.float64), 0
    for batch in tqdm(batches, desc="scoring", leave=False):
        states = base_model(teacher)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_hidden_states=True, use_cache=False).hidden_states  # fmt: skip
        rows = batch["attention_mask"].bool()
        scores, rows = importance.batch_tangent_scores(states[-1], weight, batch, rows, head_bias=bias)
        acc.update(scores, rows.sum(1))
        magnitude += sum(h[rows].abs().double().sum(0).cpu() for h in states) / len(states)
        tokens += int(rows.sum())
    return {"flexkd": acc.scores(), "magnitude": (magnitude / tokens).float()}


def select(
    selection: str, scores: dict[str, torch.Tensor], width: int, d_teacher: int, seed: int
) -> list[int]:
    if selection == "random":
        return torch.randperm(d_teacher, generator=torch.Generator().manual_seed(seed))[:width].tolist()
    return importance.select_units(scores[selection], width).tolist()


def build_student(teacher, units: list[int], batches: list[dict], args):
    """The student of ``units``: prune statistics on the scoring batches, the plan (norms calibrated), the cut."""
    shapes = prune.teacher_shapes(teacher.config)
    stats = prune.collect_prune_statistics(teacher, batches, units, need_heads=shapes.family != "llama")
    plan = prune.make_plan(teacher.config, units, stats, num_layers=args.num_layers,
                           intermediate_size=args.intermediate_size, calibrate_norms=True)  # fmt: skip
    return prune.prune_model(teacher, plan).requires_grad_(True)


# ------------------------------------------------------------------------------------------- heal and eval


def valid_nll(model, tokenizer, rows, args) -> float:
    batches = evaluate.nll_batches(rows, tokenizer, max_length=args.max_length, batch_size=args.batch)
    return evaluate.response_nll(model, batches).mean


def heal(student, teacher, heal_batches: list[dict], teacher_rows: dict[int, torch.Tensor], args, desc: str):
    """``--heal-steps`` AdamW steps of LM + reverse KL on response tokens; ``teacher_rows`` caches the teacher's
    LM-head input on each step's response tokens (shared by the selections of a seed)."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=1e-8, weight_decay=0.0)
    t_head, s_head = teacher.get_output_embeddings(), student.get_output_embeddings()
    log = []
    student.train()
    for step in tqdm(range(args.heal_steps), desc=desc, leave=False):
        batch = heal_batches[step % len(heal_batches)]
        mask = batch["loss_mask"]
        if step not in teacher_rows:
            with torch.no_grad():
                teacher_rows[step] = head_input(teacher, batch)[mask]
        s_logits = s_head(head_input(student, batch)[mask])  # (R, V): response tokens only
        with torch.no_grad():
            t_logits = t_head(teacher_rows[step])
        lm = losses.lm_loss(s_logits, batch["labels"][mask])
        kd = losses.logit_divergence(s_logits, t_logits, None, kind=args.logit)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.heal_steps))
        optimizer.zero_grad(set_to_none=True)
        (lm + kd).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.append(dict(step=step, lm=lm.item(), logit=kd.item()))
    student.eval()
    return log


# ------------------------------------------------------------------------------------------------ report


def report(out: Path, runs: list[dict], teacher_nll: float, args, d_teacher: int) -> str:
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"Teacher {args.teacher} (d_T = {d_teacher}); students d_S = {args.width}, layers "
        f"{args.num_layers or 'all'}, MLP {args.intermediate_size or 'all'}; heal {args.heal_steps} steps x "
        f"{args.batch}, lr {args.lr:g}, LM + {args.logit.upper()}. Response NLL (nats/token) on the first {args.eval_rows} rows "
        f"of {Path(args.valid).name}; mean ± std over seeds {seeds}.",
        "",
        "| selection | zero-shot NLL ↓ | healed NLL ↓ | per seed (zero-shot → healed) |",
        "| --- | --- | --- | --- |",
        f"| teacher | {teacher_nll:.3f} | – | – |",
    ]
    summary = {}
    for selection in args.selections:
        mine = sorted((r for r in runs if r["selection"] == selection), key=lambda r: r["seed"])
        if not mine:
            continue
        stats = {k: evaluate.mean_std([r[k] for r in mine]) for k in ("zero_shot_nll", "healed_nll")}
        summary[selection] = {k: dict(mean=m, std=s) for k, (m, s) in stats.items()}
        (zm, zs), (hm, hs) = stats["zero_shot_nll"], stats["healed_nll"]
        per_seed = ", ".join(f"s{r['seed']}: {r['zero_shot_nll']:.3f} → {r['healed_nll']:.3f}" for r in mine)
        lines.append(f"| {selection} | {zm:.3f} ± {zs:.3f} | {hm:.3f} ± {hs:.3f} | {per_seed} |")
    units = {(r["selection"], r["seed"]): r["units"] for r in runs}
    overlap = {
        s: importance.selection_overlap(units[("flexkd", s)], units[("magnitude", s)])
        for s in seeds
        if ("flexkd", s) in units and ("magnitude", s) in units
    }
    if overlap:
        per_seed = ", ".join(f"s{s}: {v:.3f}" for s, v in overlap.items())
        mean = sum(overlap.values()) / len(overlap)
        lines += ["", f"flexkd ∩ magnitude overlap: {per_seed} (mean {mean:.3f}; two random selections "
                      f"share {args.width / d_teacher:.3f} on average)"]  # fmt: skip
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), teacher_nll=teacher_nll, summary=summary,
                                                      overlap=overlap, runs=runs), indent=1))  # fmt: skip
    return table


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for path in (args.train, args.valid):
        if not Path(path).is_file():
            raise SystemExit(f"data file not found: {path}")
    teacher, tokenizer = load_teacher(args.teacher, args.device)
    shapes = prune.teacher_shapes(teacher.config)
    if not 0 < args.width < shapes.d_teacher or (shapes.family == "llama" and args.width % shapes.num_heads):
        raise SystemExit(f"--width {args.width} must be < d_T = {shapes.d_teacher}"
                         + (f" and a multiple of {shapes.num_heads} heads" if shapes.family == "llama" else ""))  # fmt: skip
    pad_id = data.pad_token_id(tokenizer)
    rows = data.load_instruction_rows(args.train, max_rows=args.train_rows)
    train_set = data.InstructionDataset(rows, tokenizer, max_length=args.max_length)
    if args.score_examples >= len(train_set):
        raise SystemExit(f"--score-examples {args.score_examples} leaves no healing row of {len(train_set)}")
    valid = evaluate.load_eval_rows(args.valid, tokenizer=tokenizer, max_rows=args.eval_rows)

    teacher_key = [args.teacher, args.valid, args.eval_rows, args.max_length]
    cache = out / "teacher.json"
    if cache.exists() and json.loads(cache.read_text())["key"] == teacher_key:
        teacher_nll = json.loads(cache.read_text())["nll"]
    else:
        teacher_nll = valid_nll(teacher, tokenizer, valid, args)
        cache.write_text(json.dumps(dict(key=teacher_key, nll=teacher_nll)))
    print(f"teacher: response NLL {teacher_nll:.3f} on {len(valid)} rows")

    key = {k: getattr(args, k) for k in RUN_KEYS}
    runs = []
    for seed in args.seeds:
        todo = []
        for selection in args.selections:
            path = out / "runs" / f"{selection}_seed{seed}.json"
            cached = json.loads(path.read_text()) if path.exists() else None
            if cached is not None and cached.get("key") == key:
                runs.append(cached)
            else:
                todo.append(selection)
                if cached is not None:
                    print(f"{path}: cached with other settings, running it again")
        if not todo:
            continue
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
        score_batches = make_batches(train_set, order[: args.score_examples], args.batch, pad_id, args.device)
        heal_positions = order[args.score_examples :][: args.heal_steps * args.batch]
        heal_batches = make_batches(train_set, heal_positions, args.batch, pad_id, args.device)
        scores = channel_scores(teacher, score_batches) if {"flexkd", "magnitude"} & set(todo) else {}
        teacher_rows: dict[int, torch.Tensor] = {}
        for selection in todo:
            start = time.perf_counter()
            units = select(selection, scores, args.width, shapes.d_teacher, seed)
            student = build_student(teacher, units, score_batches, args)
            zero_shot = valid_nll(student, tokenizer, valid, args)
            build_s, start = time.perf_counter() - start, time.perf_counter()
            log = heal(student, teacher, heal_batches, teacher_rows, args, f"heal {selection} seed {seed}")
            healed = valid_nll(student, tokenizer, valid, args) if args.heal_steps else zero_shot
            run = dict(selection=selection, seed=seed, key=key, units=units, zero_shot_nll=zero_shot,
                       healed_nll=healed, params=sum(p.numel() for p in student.parameters()), log=log,
                       build_s=build_s, heal_s=time.perf_counter() - start)  # fmt: skip
            (out / "runs" / f"{selection}_seed{seed}.json").write_text(json.dumps(run))
            print(f"{selection} seed {seed}: NLL {zero_shot:.3f} zero-shot, {healed:.3f} healed "
                  f"({build_s:.0f} s cut + eval, {run['heal_s']:.0f} s heal + eval)")  # fmt: skip
            runs.append(run)
            del student
    print(report(out, runs, teacher_nll, args, shapes.d_teacher))


if __name__ == "__main__":
    main()
