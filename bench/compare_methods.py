"""Side-by-side comparison of the distillation methods on a real teacher (issue 4), runnable on 2 CPU cores.

    python bench/compare_methods.py --train ../shared/data/instruct/dolly_dev.jsonl \
        --valid ../shared/data/instruct/dolly_valid.jsonl --out runs/compare

Teacher: SmolLM2-135M-Instruct (``--teacher``, any local dir / hub name / .gguf). Student: a narrower,
shallower LLaMA with the teacher's tokenizer (``--student-width``, ``--student-layers``). Methods (the same
``loss.*`` switch as ``launch/distill.py``; every method keeps the supervised LM term, weight 1):

    sft        LM loss only                     fkl        + forward KL          rkl     + reverse KL (MiniLLM)
    projector  + rkl + Linear(d_S->d_T) MSE     cka        + rkl + linear CKA    flexkd  + rkl + Flex-KD

For each seed every method sees the same examples in the same order, the same number of steps and the same
student initialisation; the seed sets the data order (and the projector's init). The loss of every method is
``flexkd_ds.method.objective.micro_objective``, the trainer's own normalisation, in one process (no DeepSpeed: the
point here is the objective, and one process keeps 18 runs inside an hour on a laptop).

Why it is cheap enough for a CPU: the teacher is frozen and the data order is fixed, so its last hidden state
is computed once per training example (the same pass scores the units for Flex-KD) and kept; teacher logits
are ``lm_head(hidden)``, exactly what the teacher's forward would give. Logits (teacher and student) are only
formed on response tokens, the only rows the LM and logit terms use. Runs are cached as JSON under
``--out/runs``: an interrupted benchmark picks up where it stopped.

Student (``--student-width``, ``--student-layers``): randomly initialised, ``models.narrow_student_config`` of
the teacher (same vocabulary, tokenizer and rope; the teacher's head dim 64; MLP width scaled with the hidden
size) — by default 256 wide (d_T = 576) and 4 layers deep. A seed fixes the student's init, the data order and
the projector's init; all methods of one seed share them.

Writes ``--out/results.json``, ``results.md`` (method | NLL | ROUGE-L | wall time, mean ± std over seeds) and
``valid_nll.png`` (validation response NLL over steps, mean ± std band).
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
from flexkd_ds.evaluation.generation import generate
from flexkd_ds.inputs import data, models
from flexkd_ds.method import importance, losses
from flexkd_ds.method.objective import ObjectiveWeights, micro_objective

METHODS = {
    "sft": dict(feature_loss="none", logit_loss="none"),
    "fkl": dict(feature_loss="none", logit_loss="fkl"),
    "rkl": dict(feature_loss="none", logit_loss="rkl"),
    "projector": dict(feature_loss="projector", logit_loss="rkl"),
    "cka": dict(feature_loss="cka", logit_loss="rkl"),
    "flexkd": dict(feature_loss="flexkd", logit_loss="rkl"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--train", required=True, help="training set, MiniLLM-layout JSONL (e.g. dolly_dev.jsonl)")
    p.add_argument(
        "--valid", required=True, help="evaluation set, MiniLLM-layout JSONL (e.g. dolly_valid.jsonl)"
    )
    p.add_argument("--out", default="runs/compare", help="output dir (runs are cached and resumed here)")
    p.add_argument(
        "--teacher", default="smollm2-135m-instruct", help="dir, hub name, .gguf or smollm2-135m-instruct"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--train-rows", type=int, default=320, help="first N rows of --train")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4, help="linear warmup steps, then cosine to 0")
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=[0.05],
        help="feature-loss weight (paper: 0.05); several values sweep it: projector, cka and flexkd then run "
        "once per value and appear as e.g. 'flexkd a=0.005' rows",
    )
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--max-prompt-length", type=int, default=96)
    p.add_argument("--student-width", type=int, default=256, help="d_S (teacher d_T = 576 for SmolLM2)")
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10, help="validation-NLL curve every N steps")
    p.add_argument("--curve-rows", type=int, default=32, help="--valid rows of the validation curve")
    p.add_argument("--nll-rows", type=int, default=100, help="--valid rows of the final response NLL")
    p.add_argument("--rouge-rows", type=int, default=60, help="--valid rows generated for ROUGE-L (greedy)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--save-students",
        action="store_true",
        help="save every trained student as a Hugging Face dir under --out/students/<run>/ (with the teacher's "
        "tokenizer), so launch/evaluate.py can score them on other sets",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default when present) or cpu",
    )
    return p.parse_args(argv)


FEATURE_METHODS = ("projector", "cka", "flexkd")  # the methods alpha weighs
# What makes two runs of one method and seed the same run (a cached run with other values is run again).
RUN_KEYS = ("teacher", "train", "valid", "train_rows", "steps", "batch_size", "lr", "warmup", "max_length",
            "max_prompt_length", "student_width", "student_layers", "eval_every", "curve_rows", "nll_rows",
            "rouge_rows", "max_new_tokens")  # fmt: skip


def variants(args) -> list[tuple[str, str, float]]:
    """(label, method, alpha) per table row: a feature method once per ``--alpha`` value, the others once."""
    out = []
    for method in args.methods:
        if method in FEATURE_METHODS and len(args.alpha) > 1:
            out += [(f"{method} a={a:g}", method, a) for a in args.alpha]
        else:
            out.append((method, method, args.alpha[0]))
    return out


def run_name(method: str, alpha: float, seed: int) -> str:
    return f"{method}-a{alpha:g}-seed{seed}" if method in FEATURE_METHODS else f"{method}-seed{seed}"


# ------------------------------------------------------------------------------------------- teacher side


def load_teacher(source: str, cache_dir: Path):
    """The teacher in fp32, saved once as a Hugging Face dir (a GGUF de-quantises in ~30 s; a dir loads in 1)."""
    hf_dir = cache_dir / "teacher_hf"
    if not (hf_dir / "config.json").exists():
        src = models.resolve_model_source(source)
        teacher = models.load_causal_lm(src, dtype=torch.float32)
        tokenizer = models.load_tokenizer(src)
        fresh = type(teacher)(
            teacher.config
        )  # a GGUF-loaded model refuses save_pretrained; a plain copy does not
        fresh.load_state_dict(teacher.state_dict())
        if hasattr(fresh.config, "quantization_config"):
            del fresh.config.quantization_config
        fresh.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    teacher = models.load_causal_lm(hf_dir, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = models.load_tokenizer(hf_dir)
    models.ensure_pad_token(tokenizer)
    return teacher, tokenizer


def last_hidden(model, batch) -> torch.Tensor:
    """(B, T, d) the LM-head input (post final norm) of a LLaMA-family model."""
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


@torch.no_grad()
def teacher_pass(teacher, dataset, pad_id: int, batch_size: int = 8):
    """One forward per training example: its last hidden state (kept, fp32) and the function-tangent scores."""
    weight = teacher.get_output_embeddings().weight
    acc = importance.ImportanceAccumulator(weight.shape[1])
    hidden_per_example = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="teacher pass"):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        device = teacher.device
        batch = {k: v.to(device) for k, v in data.collate(items, pad_id).items()}
        hidden = last_hidden(teacher, batch)
        rows = batch["attention_mask"].bool()
        acc.update(importance.tangent_scores(hidden, weight, rows), rows.sum(1))
        hidden_per_example += [hidden[i, : len(ex["input_ids"])].cpu().clone() for i, ex in enumerate(items)]
    return hidden_per_example, acc.scores()


# ------------------------------------------------------------------------------------------- student side


def build_student(teacher_config, width: int, layers: int, seed: int):
    """A randomly initialised narrow LLaMA: ``models.narrow_student_config`` of the teacher (same vocabulary,
    special tokens, rope; the teacher's head dim; MLP width scaled with the hidden size)."""
    torch.manual_seed(seed)
    cfg = models.narrow_student_config(teacher_config, hidden_size=width, num_layers=layers)
    return models.build_causal_lm_from_config(cfg, dtype=torch.float32)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pad_hidden(hidden: list[torch.Tensor], width: int) -> torch.Tensor:
    out = hidden[0].new_zeros(len(hidden), width, hidden[0].shape[-1])
    for i, h in enumerate(hidden):
        out[i, : h.shape[0]] = h
    return out


def train_one(method: str, alpha: float, seed: int, args, teacher, tokenizer, train_set, teacher_hidden,
              unit_indices, curve_rows) -> dict:  # fmt: skip
    weights = ObjectiveWeights(alpha=alpha, beta=1.0, lm_weight=1.0, **METHODS[method])
    device = teacher.device
    student = build_student(teacher.config, args.student_width, args.student_layers, seed).to(device)
    projector = (
        losses.Projector(args.student_width, teacher.config.hidden_size).to(device)
        if method == "projector"
        else None
    )
    params = list(student.parameters()) + (list(projector.parameters()) if projector else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=1e-8, weight_decay=1e-6)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    pad_id = data.pad_token_id(tokenizer)
    t_head = teacher.get_output_embeddings()
    curve, log = [], []
    train_s = 0.0
    for step in tqdm(range(args.steps), desc=f"{method} seed {seed}", leave=False):
        if args.eval_every and step % args.eval_every == 0:
            curve.append((step, _valid_nll(student, tokenizer, curve_rows, args)))
        start = time.perf_counter()
        picks = [order[(step * args.batch_size + k) % len(order)] for k in range(args.batch_size)]
        batch = {k: v.to(device) for k, v in data.collate([train_set[i] for i in picks], pad_id).items()}
        mask = batch["loss_mask"]  # (B, T) response tokens: the only rows of the LM and logit terms
        student.train()
        s_hidden = last_hidden(student, batch)  # (B, T, d_S)
        s_logits = student.get_output_embeddings()(s_hidden[mask])[None]  # (1, R, V)
        t_hidden = pad_hidden([teacher_hidden[i] for i in picks], batch["input_ids"].shape[1]).to(device)
        t_logits = t_head(t_hidden[mask])[None] if weights.uses_logit else None
        terms = micro_objective(
            weights, student_logits=s_logits, teacher_logits=t_logits, student_hidden=s_hidden,
            teacher_hidden=t_hidden, projected_hidden=projector(s_hidden) if projector else None,
            labels=batch["labels"][mask][None], feature_mask=batch["attention_mask"].bool(),
            unit_indices=unit_indices.long(), global_tokens=float(mask.sum()), grad_accum=1, world_size=1,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        train_s += time.perf_counter() - start  # optimisation only: the curve evaluations are not counted
        log.append(dict(step=step, loss=float(terms.loss.detach()), lm=terms.lm_sum / float(mask.sum())))
    curve.append((args.steps, _valid_nll(student, tokenizer, curve_rows, args)))
    return dict(method=method, alpha=alpha, seed=seed, train_s=train_s, curve=curve, log=log, student=student)


def _valid_nll(model, tokenizer, rows, args) -> float:
    batches = evaluate.nll_batches(rows, tokenizer, max_length=args.max_length, batch_size=8)
    return evaluate.response_nll(model, batches).mean


def final_eval(model, tokenizer, nll_rows, rouge_rows, args) -> dict:
    start = time.perf_counter()
    nll = _valid_nll(model, tokenizer, nll_rows, args)
    predictions = generate(model, tokenizer, [r.prompt for r in rouge_rows], max_new_tokens=args.max_new_tokens,
                           batch_size=12, max_prompt_length=args.max_length, progress=False)  # fmt: skip
    rouge = evaluate.rouge_l(predictions, [r.references for r in rouge_rows])
    return dict(
        nll=nll,
        rougeL=sum(rouge) / len(rouge),
        eval_s=time.perf_counter() - start,
        examples=[
            dict(prompt=r.prompt[-200:], prediction=p)
            for r, p in zip(rouge_rows[:3], predictions[:3], strict=True)
        ],
    )


# ------------------------------------------------------------------------------------------------ report


def report(out: Path, runs: list[dict], teacher_eval: dict, args) -> str:
    rows = [
        "| method | response NLL ↓ | ROUGE-L ↑ | train s / run | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows.append(
        f"| teacher (SmolLM2-135M) | {teacher_eval['nll']:.3f} | {teacher_eval['rougeL']:.2f} | – | – |"
    )
    summary = {}
    for label, _, _ in variants(args):
        mine = [r for r in runs if r["label"] == label]
        if not mine:
            continue
        stats = {k: evaluate.mean_std([r[k] for r in mine]) for k in ("nll", "rougeL", "train_s")}
        summary[label] = {k: dict(mean=m, std=s) for k, (m, s) in stats.items()}
        (nm, ns), (rm, rs), (tm, _) = stats["nll"], stats["rougeL"], stats["train_s"]
        rows.append(f"| {label} | {nm:.3f} ± {ns:.3f} | {rm:.2f} ± {rs:.2f} | {tm:.0f} | {len(mine)} |")
    table = "\n".join(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), teacher=teacher_eval, summary=summary,
                                                      runs=runs), indent=1))  # fmt: skip
    _plot(out / "valid_nll.png", runs, args)
    return table


def _plot(path: Path, runs: list[dict], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, _, _ in variants(args):
        curves = [r["curve"] for r in runs if r["label"] == label]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        values = torch.tensor([[v for _, v in c] for c in curves])
        mean, std = values.mean(0), values.std(0, unbiased=False)
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation response NLL (nats/token, {args.curve_rows} rows)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for path in (args.train, args.valid):
        if not Path(path).is_file():
            raise SystemExit(f"data file not found: {path}")
    teacher, tokenizer = load_teacher(args.teacher, out)
    teacher.to(args.device)
    if args.student_width >= teacher.config.hidden_size:
        raise SystemExit(
            f"--student-width {args.student_width} must be < the teacher's {teacher.config.hidden_size}"
        )
    rows = data.load_instruction_rows(args.train, max_rows=args.train_rows)
    train_set = data.InstructionDataset(rows, tokenizer, max_length=args.max_length,
                                        max_prompt_length=args.max_prompt_length, eager=True)  # fmt: skip
    valid = evaluate.load_eval_rows(
        args.valid, tokenizer=tokenizer, max_rows=max(args.nll_rows, args.rouge_rows)
    )
    curve_rows, nll_rows, rouge_rows = (
        valid[: args.curve_rows],
        valid[: args.nll_rows],
        valid[: args.rouge_rows],
    )

    cache = out / "teacher_pass.pt"
    if cache.exists() and torch.load(cache)["key"] == [args.train, args.train_rows, args.max_length]:
        saved = torch.load(cache)
        teacher_hidden, scores, teacher_eval = saved["hidden"], saved["scores"], saved["eval"]
    else:
        start = time.perf_counter()
        teacher_hidden, scores = teacher_pass(teacher, train_set, data.pad_token_id(tokenizer))
        teacher_eval = final_eval(teacher, tokenizer, nll_rows, rouge_rows, args)
        teacher_eval["pass_s"] = time.perf_counter() - start
        torch.save(dict(key=[args.train, args.train_rows, args.max_length], hidden=teacher_hidden, scores=scores,
                        eval=teacher_eval), cache)  # fmt: skip
    unit_indices = importance.select_units(scores, args.student_width).to(args.device)
    print(
        f"teacher: NLL {teacher_eval['nll']:.3f}, ROUGE-L {teacher_eval['rougeL']:.2f}; "
        f"tail mass at d_S={args.student_width}: {importance.tail_mass(scores, args.student_width):.3f}"
    )

    runs = []
    key = {k: getattr(args, k) for k in RUN_KEYS}
    for seed in args.seeds:
        for label, method, alpha in variants(args):
            name = run_name(method, alpha, seed)
            path, student_dir = out / "runs" / f"{name}.json", out / "students" / name
            if path.exists():
                cached = json.loads(path.read_text())
                missing_student = args.save_students and not student_dir.is_dir()
                if cached.get("key") == key and not missing_student:
                    runs.append(dict(cached, label=label))
                    continue
                why = (
                    "its student was not saved" if cached.get("key") == key else "cached with other settings"
                )
                print(f"{path}: {why}, running it again")
            run = train_one(method, alpha, seed, args, teacher, tokenizer, train_set, teacher_hidden,
                            unit_indices, curve_rows)  # fmt: skip
            student = run.pop("student")
            if args.save_students:
                student.save_pretrained(student_dir)
                tokenizer.save_pretrained(student_dir)
            run.update(final_eval(student, tokenizer, nll_rows, rouge_rows, args), key=key)
            path.write_text(json.dumps(run))
            print(
                f"{label} seed {seed}: NLL {run['nll']:.3f} ROUGE-L {run['rougeL']:.2f} "
                f"({run['train_s']:.0f} s train, {run['eval_s']:.0f} s eval)"
            )
            runs.append(dict(run, label=label))
    print(report(out, runs, teacher_eval, args))


if __name__ == "__main__":
    main()
