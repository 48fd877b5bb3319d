"""Step-time overhead of each feature term over logit-only KD, measured in one run on the same models and batches.

    python bench/step_overhead.py                  # CPU-sized default: teacher 512 x 4, student 256 x 4, V 8192
    python bench/step_overhead.py --preset gpu     # teacher 4096 x 4, student 2048 x 4, V 32000, 8 x 1024, bf16
    python bench/step_overhead.py --teacher-config path/to/config.json --student-hidden 256   # a LLaMA pair

One step = teacher forward under no_grad + student forward + ``micro_objective`` + backward + AdamW step, for
rkl (logit only), Flex-KD + rkl, projector + rkl and CKA + rkl (all with the LM loss, lambda = 1). The pieces
are the library's: ``DistillStudent``, ``losses.Projector``, ``micro_objective`` with ``ObjectiveWeights``,
models from ``tiny_config`` / ``narrow_student_config``. No DeepSpeed: plain torch AdamW, world 1 (the
feature terms add no communication at local scope), so what differs between the methods is the extra compute
of each feature term. Each method has its own student (same init) and optimizer; the methods run round-robin,
rotating the order every repetition, so load drift hits them alike. Unit indices are a random d_S-subset of the
teacher units (the one-off importance scoring is not part of the step).
Columns: median / p10 / p90 step ms; ratio = median / median of logit-only; paired = median over repetitions
of (step / logit-only step of the same repetition); term = the feature term alone (forward + backward of its
loss on that step's hidden states; projector: Linear included, its AdamW update not); share = term / step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from datetime import date

import torch

from flexkd_ds import ops
from flexkd_ds.engine import HeadInput
from flexkd_ds.losses import Projector
from flexkd_ds.models import (
    build_causal_lm_from_config,
    lm_head_input_size,
    narrow_student_config,
    resolve_dtype,
    tiny_config,
)
from flexkd_ds.objective import ObjectiveWeights, micro_objective
from flexkd_ds.trainer import DistillStudent

PRESETS = {
    "cpu": dict(teacher_hidden=512, student_hidden=256, layers=4, vocab=8192, batch=4, seq=128, steps=15,
                warmup=3, dtype="fp32"),
    "gpu": dict(teacher_hidden=4096, student_hidden=2048, layers=4, vocab=32000, batch=8, seq=1024, steps=30,
                warmup=5, dtype="bf16"),
}  # fmt: skip
METHODS = {
    "rkl (logit only)": "none",
    "flexkd + rkl": "flexkd",
    "projector + rkl": "projector",
    "cka + rkl": "cka",
}
HEAD_DIM = 64
GOAL = 0.03  # the issue: Flex-KD adds at most 3% to the logit-KD step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults below come from it")
    for name in ("teacher-hidden", "student-hidden", "layers", "vocab", "batch", "seq", "steps", "warmup"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument(
        "--teacher-config", help="LLaMA-family config.json (or its dir): random weights of that shape"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--impl", choices=list(ops.IMPLS), default="auto", help="correlation: auto/torch/triton")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_models(args, device, dtype):
    if args.teacher_config:
        from transformers import AutoConfig

        t_cfg = AutoConfig.from_pretrained(args.teacher_config)
        t_cfg.max_position_embeddings = max(args.seq, t_cfg.max_position_embeddings)
        s_cfg = narrow_student_config(t_cfg, hidden_size=args.student_hidden, num_layers=args.layers)
    else:
        t_cfg = tiny_config("llama", hidden_size=args.teacher_hidden, num_layers=args.layers,
                            num_heads=max(1, args.teacher_hidden // HEAD_DIM), vocab_size=args.vocab,
                            max_positions=args.seq)  # fmt: skip
        s_cfg = narrow_student_config(t_cfg, hidden_size=args.student_hidden, num_layers=args.layers)
    teacher = (
        build_causal_lm_from_config(t_cfg, seed=args.seed, dtype=dtype)
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    d_t, d_s = lm_head_input_size(t_cfg), lm_head_input_size(s_cfg)
    students = {}
    for name, feature in METHODS.items():
        model = build_causal_lm_from_config(
            s_cfg, seed=args.seed + 1, dtype=dtype
        )  # same init for every method
        torch.manual_seed(args.seed + 2)
        projector = Projector(d_s, d_t).to(dtype) if feature == "projector" else None
        module = DistillStudent(model, projector).to(device).train()
        fused = {"fused": True} if device.type == "cuda" else {}
        students[name] = (module, torch.optim.AdamW(module.parameters(), lr=1e-5, **fused))
    return teacher, students, t_cfg, d_t, d_s


def make_batches(args, vocab, device, count=4):
    """Right-padded sequences (lengths in [3/4 seq, seq]); the first quarter of each is prompt (no labels)."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
        lengths = torch.randint(3 * args.seq // 4, args.seq + 1, (args.batch,), generator=gen)
        positions = torch.arange(args.seq)
        attention = (positions[None] < lengths[:, None]).long()
        ids = ids * attention
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(attention[:, 1:].bool(), ids[:, 1:], -100)
        labels[:, : args.seq // 4] = -100
        batch = dict(input_ids=ids, attention_mask=attention, labels=labels)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(weights, teacher, capture, module, optimizer, batch, units):
    with torch.no_grad():
        t_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    t_hidden = capture.pop()
    s_logits, s_hidden, projected = module(batch["input_ids"], batch["attention_mask"])
    terms = micro_objective(weights, **objective_inputs(s_logits, t_logits.logits, s_hidden, t_hidden, projected,
                                                        batch, units))  # fmt: skip
    terms.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return s_logits.detach(), s_hidden.detach(), t_hidden


def objective_inputs(s_logits, t_logits, s_hidden, t_hidden, projected, batch, units):
    return dict(student_logits=s_logits, teacher_logits=t_logits, student_hidden=s_hidden, teacher_hidden=t_hidden,
                projected_hidden=projected, labels=batch["labels"], feature_mask=batch["attention_mask"].bool(),
                unit_indices=units, global_tokens=float((batch["labels"] != -100).sum()), grad_accum=1,
                world_size=1)  # fmt: skip


def feature_term(weights, module, s_logits, s_hidden, t_hidden, batch, units):
    """Forward + backward of the feature term alone (beta = lambda = 0) on one step's hidden states."""
    s_hidden = s_hidden.requires_grad_(True)
    projected = module.projector(s_hidden) if module.projector is not None else None
    only = dataclasses.replace(weights, beta=0.0, lm_weight=0.0)
    terms = micro_objective(
        only, **objective_inputs(s_logits, None, s_hidden, t_hidden, projected, batch, units)
    )
    terms.loss.backward()
    module.zero_grad(set_to_none=True)


def timed(device, fn, *args):
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return 1000 * (time.perf_counter() - start), out


def pct(values, q):
    return statistics.quantiles(values, n=10, method="inclusive")[q] if len(values) > 1 else values[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    load_before = os.getloadavg()
    teacher, students, t_cfg, d_t, d_s = build_models(args, device, dtype)
    capture = HeadInput(teacher)
    batches = make_batches(args, t_cfg.vocab_size, device)
    units = torch.randperm(d_t, generator=torch.Generator().manual_seed(args.seed))[:d_s].to(device)
    weights = {
        name: ObjectiveWeights(feature_loss=feature, logit_loss="rkl", alpha=args.alpha, impl=args.impl)
        for name, feature in METHODS.items()
    }
    step_ms = {name: [] for name in METHODS}
    term_ms = {name: [] for name in METHODS}
    names = list(METHODS)
    for rep in range(args.warmup + args.steps):
        batch = batches[rep % len(batches)]
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order
            module, optimizer = students[name]
            ms, (s_logits, s_hidden, t_hidden) = timed(
                device, train_step, weights[name], teacher, capture, module, optimizer, batch, units
            )
            term = 0.0
            if METHODS[name] != "none":
                term, _ = timed(
                    device, feature_term, weights[name], module, s_logits, s_hidden, t_hidden, batch, units
                )
            if rep >= args.warmup:
                step_ms[name].append(ms)
                term_ms[name].append(term)
    load_after = os.getloadavg()

    base = names[0]
    impl = ops.resolve_impl(args.impl, t_hidden, s_hidden)
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, (m, _) in students.items()}
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches) / len(batches))
    print(f"step overhead of the feature terms, {date.today()}  torch {torch.__version__}")
    print("no DeepSpeed: plain torch AdamW, world 1 -- measures the extra compute of each feature term")
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"device {dev}  dtype {args.dtype}  correlation impl {impl}  alpha {args.alpha}")
    print(
        f"load average (1/5/15 min) before {fmt3(load_before)}  after {fmt3(load_after)}  cores {os.cpu_count()}"
    )
    print(f"teacher LLaMA d_T {d_t} x {t_cfg.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params; student d_S {d_s} x {args.layers} "
          f"layers, {params[base]:.1f}M params (+{params['projector + rkl'] - params[base]:.2f}M projector); "
          f"vocab {t_cfg.vocab_size}; batch {args.batch} x {args.seq} (~{tokens} non-pad tokens)")  # fmt: skip
    print(f"{args.steps} timed steps per method after {args.warmup} warm-up, round-robin\n")
    header = f"{'method':<18} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'ratio':>7} {'paired':>7}"
    print(header + f" {'term ms':>8} {'share':>7}")
    print("-" * (len(header) + 17))
    base_median = statistics.median(step_ms[base])
    result = {}
    for name in names:
        times = step_ms[name]
        median = statistics.median(times)
        paired = statistics.median(t / b for t, b in zip(times, step_ms[base], strict=True))
        term = statistics.median(term_ms[name])
        result[name] = paired
        print(f"{name:<18} {median:>10.1f} {pct(times, 0):>9.1f} {pct(times, -1):>9.1f} "
              f"{median / base_median:>7.3f} {paired:>7.3f} {term:>8.1f} {term / median:>7.1%}")  # fmt: skip
    over = result["flexkd + rkl"] - 1
    verdict = "met" if over <= GOAL else "NOT met"
    print(f"\nFlex-KD overhead over logit-only KD (paired): {over:+.1%}  goal <= {GOAL:.0%}: {verdict}")


def fmt3(load):
    return "/".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
