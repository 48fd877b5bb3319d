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
Goal (the issue): Flex-KD adds <= 3% to the logit-KD step. It is judged on the paired whole step when its
p10..p90 spread is narrower than 3%, else (a loaded machine) on the term alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from datetime import date

import torch

from flexkd_ds.inputs.models import (
    build_causal_lm_from_config,
    lm_head_input_size,
    narrow_student_config,
    resolve_dtype,
    tiny_config,
)
from flexkd_ds.jobs.distill import DistillStudent
from flexkd_ds.method import ops
from flexkd_ds.method.losses import Projector, check_unit_indices
from flexkd_ds.method.objective import ObjectiveWeights, micro_objective
from flexkd_ds.runtime.engines import HeadInput

PRESETS = {
    "cpu": dict(teacher_hidden=512, student_hidden=256, layers=4, vocab=8192, batch=4, seq=128, steps=25,
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
    p.add_argument("--teacher-config", help="LLaMA config.json (or its dir): random weights of that shape")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--impl", choices=list(ops.IMPLS), default="auto", help="correlation: auto/torch/triton")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's); 1 helps under load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_models(args, device, dtype):
    """The frozen teacher and, per method, (DistillStudent, AdamW): one student each, all with the same init."""
    if args.teacher_config:
        from transformers import AutoConfig

        t_cfg = AutoConfig.from_pretrained(args.teacher_config)
        t_cfg.max_position_embeddings = max(args.seq, t_cfg.max_position_embeddings)
    else:
        t_cfg = tiny_config("llama", hidden_size=args.teacher_hidden, num_layers=args.layers,
                            num_heads=max(1, args.teacher_hidden // HEAD_DIM), vocab_size=args.vocab,
                            max_positions=args.seq)  # fmt: skip
    s_cfg = narrow_student_config(t_cfg, hidden_size=args.student_hidden, num_layers=args.layers)
    # Built on the device: a random init of the GPU preset's ~2.9 B parameters on the host CPU outlasted a
    # 120 s limit on a 16-core GPU machine (2026-12-04).
    with torch.device(device):
        teacher = build_causal_lm_from_config(t_cfg, seed=args.seed, dtype=dtype).eval()
    teacher.requires_grad_(False)
    d_t, d_s = lm_head_input_size(t_cfg), lm_head_input_size(s_cfg)
    fused = {"fused": True} if device.type == "cuda" else {}
    students = {}
    for name, feature in METHODS.items():
        with torch.device(device):
            model = build_causal_lm_from_config(s_cfg, seed=args.seed + 1, dtype=dtype)
        torch.manual_seed(args.seed + 2)
        projector = Projector(d_s, d_t).to(dtype) if feature == "projector" else None
        module = DistillStudent(model, projector).to(device).train()
        students[name] = (module, torch.optim.AdamW(module.parameters(), lr=1e-5, **fused))
    return teacher, students, t_cfg, d_t, d_s


def make_batches(args, vocab, device, count=4):
    """Right-padded sequences (lengths in [3/4 seq, seq]); the first quarter of each is prompt (no labels)."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
        lengths = torch.randint(3 * args.seq // 4, args.seq + 1, (args.batch,), generator=gen)
        attention = (torch.arange(args.seq)[None] < lengths[:, None]).long()
        ids = ids * attention
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(attention[:, 1:].bool(), ids[:, 1:], -100)
        labels[:, : args.seq // 4] = -100
        batch = dict(input_ids=ids, attention_mask=attention, labels=labels)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def objective_inputs(s_logits, t_logits, s_hidden, t_hidden, projected, batch, units):
    return dict(student_logits=s_logits, teacher_logits=t_logits, student_hidden=s_hidden, teacher_hidden=t_hidden,
                projected_hidden=projected, labels=batch["labels"], feature_mask=batch["attention_mask"].bool(),
                unit_indices=units, global_tokens=float((batch["labels"] != -100).sum()), grad_accum=1,
                world_size=1, global_feature_rows=float(batch["attention_mask"].sum()),
                units_checked=True)  # fmt: skip  # checked once in main(), as the trainer does


def train_step(weights, teacher, capture, module, optimizer, batch, units):
    with torch.no_grad():
        t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    t_hidden = capture.pop()
    s_logits, s_hidden, projected = module(batch["input_ids"], batch["attention_mask"])
    inputs = objective_inputs(s_logits, t_out.logits, s_hidden, t_hidden, projected, batch, units)
    micro_objective(weights, **inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return s_logits.detach(), s_hidden.detach(), t_hidden


def feature_term(weights, module, s_logits, s_hidden, t_hidden, batch, units):
    """Forward + backward of the feature term alone (beta = lambda = 0) on one step's hidden states."""
    s_hidden = s_hidden.requires_grad_(True)
    projected = module.projector(s_hidden) if module.projector is not None else None
    only = dataclasses.replace(weights, beta=0.0, lm_weight=0.0)
    micro_objective(
        only, **objective_inputs(s_logits, None, s_hidden, t_hidden, projected, batch, units)
    ).loss.backward()
    module.zero_grad(set_to_none=True)


def timed(device, fn, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start), out


def pct(values, q):
    return statistics.quantiles(values, n=10, method="inclusive")[q] if len(values) > 1 else values[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    teacher, students, t_cfg, d_t, d_s = build_models(args, device, dtype)
    print(f"models built in {time.perf_counter() - started:.1f} s; {args.warmup} + {args.steps} steps per method "
          "follow", flush=True)  # fmt: skip
    capture = HeadInput(teacher)
    batches = make_batches(args, t_cfg.vocab_size, device)
    units = torch.randperm(d_t, generator=torch.Generator().manual_seed(args.seed))[:d_s].to(device)
    check_unit_indices(units, d_t, d_s)  # once, as the trainer checks its fixed selection: no per-step host syncs
    weights = {name: ObjectiveWeights(feature_loss=feature, logit_loss="rkl", alpha=args.alpha, impl=args.impl)
               for name, feature in METHODS.items()}  # fmt: skip
    names = list(METHODS)
    step_ms, term_ms = {name: [] for name in names}, {name: [] for name in names}
    for rep in range(args.warmup + args.steps):
        batch = batches[rep % len(batches)]
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # round-robin, rotating the order
            module, optimizer = students[name]
            ms, (s_logits, s_hidden, t_hidden) = timed(
                device, train_step, weights[name], teacher, capture, module, optimizer, batch, units
            )
            term = 0.0
            if METHODS[name] != "none":
                term_args = (weights[name], module, s_logits, s_hidden, t_hidden, batch, units)
                term, _ = timed(device, feature_term, *term_args)
            if rep >= args.warmup:
                step_ms[name].append(ms)
                term_ms[name].append(term)
    loads = (load_before, os.getloadavg())

    base = names[0]
    millions = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, (m, _) in students.items()}
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"step overhead of the feature terms, {date.today()}, torch {torch.__version__}, {dev}, {os.cpu_count()} "
          f"cores, {args.dtype}, correlation impl {ops.resolve_impl(args.impl, t_hidden, s_hidden)}")  # fmt: skip
    print("no DeepSpeed: plain torch AdamW, world 1 -- measures the extra compute of each feature term")
    print(
        "load average (1/5/15 min) before "
        + "  after ".join("/".join(f"{x:.2f}" for x in lo) for lo in loads)
    )
    print(f"teacher LLaMA d_T {d_t} x {t_cfg.num_hidden_layers} layers "
          f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params); student d_S {d_s} x {args.layers} "
          f"layers ({millions[base]:.1f}M, projector +{millions['projector + rkl'] - millions[base]:.2f}M); "
          f"vocab {t_cfg.vocab_size}; batch {args.batch} x {args.seq} "
          f"(~{sum(int(b['attention_mask'].sum()) for b in batches) // len(batches)} non-pad tokens); "
          f"alpha {args.alpha}; {args.steps} timed steps per method after {args.warmup} warm-up\n")  # fmt: skip
    header = f"{'method':<18} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'ratio':>7} {'paired':>7}"
    print(f"{header} {'term ms':>8} {'share':>7}\n{'-' * (len(header) + 17)}")
    base_median = statistics.median(step_ms[base])
    for name in names:
        times, median = step_ms[name], statistics.median(step_ms[name])
        paired = statistics.median(t / b for t, b in zip(times, step_ms[base], strict=True))
        term = statistics.median(term_ms[name])
        print(f"{name:<18} {median:>10.1f} {pct(times, 0):>9.1f} {pct(times, -1):>9.1f} "
              f"{median / base_median:>7.3f} {paired:>7.3f} {term:>8.1f} {term / median:>7.1%}")  # fmt: skip
    extra = [t / b - 1 for t, b in zip(step_ms["flexkd + rkl"], step_ms[base], strict=True)]
    term_over = statistics.median(term_ms["flexkd + rkl"]) / base_median
    print(f"\nFlex-KD over logit-only KD: feature term alone {term_over:+.1%} of the logit-only step; whole step "
          f"(paired) {statistics.median(extra):+.1%}, p10..p90 {pct(extra, 0):+.1%}..{pct(extra, -1):+.1%}")  # fmt: skip
    if pct(extra, -1) - pct(extra, 0) > GOAL:  # the whole step cannot resolve 3%: judge on the term alone
        basis, over = "the term alone; the step-level p10..p90 is wider than the goal (load noise)", term_over
    else:
        basis, over = "the paired whole step", statistics.median(extra)
    print(f"goal <= {GOAL:.0%}: {'met' if over <= GOAL else 'NOT met'} (judged on {basis})")


if __name__ == "__main__":
    main()
