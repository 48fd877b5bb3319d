"""Peak memory and time of the logit + LM terms, whole logits vs chunked (issue 17).

    python bench/logit_memory.py                                   # N 4096, V 49152, d 576, fp32, CPU
    python bench/logit_memory.py --rows 1024 --repeats 2           # a quicker look
    python bench/logit_memory.py --device cuda --dtype bf16 --vocab 50272 --d-student 2048 --d-teacher 4096
    python bench/logit_memory.py --json out.json                   # the numbers, for docs/benchmarks.md

Both paths compute ``beta * sum_tokens D(p_T || p_S) + sum_tokens CE(z_S, y)`` and its gradients for the
student's hidden rows and LM head, from (N, d_S) student rows, a (V, d_S) student head, (N, d_T) teacher rows
and a (V, d_T) teacher head, exactly as the trainer calls them:

- unfused: ``z = nn.functional.linear(h, W)`` for both models, ``losses.logit_divergence`` + ``losses.lm_loss``
  on the (N, V) logits, ``backward``  (``loss.fused_logits=false``);
- fused:   ``method.fused_logits.fused_linear_divergence`` (chunks of ``default_chunk_rows(V, device)`` rows),
  ``backward``  (the default).

Each path runs in its own fresh process, so one path's allocations cannot hide in the other's peak.
Peak extra memory = the peak during the first forward + backward minus the memory held just before it (the
inputs): on CPU the process's peak RSS (``ru_maxrss``) minus its RSS then; on CUDA
``max_memory_allocated`` minus ``memory_allocated``. Time = median of ``--repeats`` forward + backward passes
after that first one. Goal (issue 17): fused peak extra <= 25 % of unfused, time <= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

import psutil
import torch

from flexkd_ds.method.fused_logits import default_chunk_rows, fused_linear_divergence
from flexkd_ds.method.losses import lm_loss, logit_divergence

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="tokens N (the label rows of a micro-batch)")
    p.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152)")
    p.add_argument("--d-student", type=int, default=576, help="d_S")
    p.add_argument("--d-teacher", type=int, default=576, help="d_T")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="hidden states and heads")
    p.add_argument("--kind", default="rkl", help="logit divergence (losses.LOGIT_DIVERGENCES)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes after the first")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", choices=["unfused", "fused"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def inputs(args):
    g = torch.Generator().manual_seed(0)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)

    def rand(*shape, scale):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype)

    s_hidden = rand(args.rows, args.d_student, scale=1.0).requires_grad_(True)
    s_weight = rand(args.vocab, args.d_student, scale=args.d_student**-0.5).requires_grad_(True)
    t_hidden = rand(args.rows, args.d_teacher, scale=1.0)
    t_weight = rand(args.vocab, args.d_teacher, scale=args.d_teacher**-0.5)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    return s_hidden, s_weight, t_hidden, t_weight, labels


def one_pass(impl: str, args, s_hidden, s_weight, t_hidden, t_weight, labels, chunk_rows=None) -> float:
    """One forward + backward; ``chunk_rows`` (fused) overrides ``default_chunk_rows`` (bench/gpu_tune.py)."""
    s_hidden.grad = s_weight.grad = None
    if impl == "fused":
        loss = fused_linear_divergence(
            s_hidden, s_weight, t_hidden, t_weight, None, labels, kind=args.kind, lm_weight=1.0,
            chunk_rows=chunk_rows,
        ).loss
    else:
        z_s = torch.nn.functional.linear(s_hidden, s_weight)
        with torch.no_grad():
            z_t = torch.nn.functional.linear(t_hidden, t_weight)
        loss = logit_divergence(z_s, z_t, None, kind=args.kind, reduction="sum") + lm_loss(
            z_s, labels, reduction="sum"
        )
    loss.backward()
    return float(loss.detach())


def held_bytes(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.memory_allocated())
    return float(psutil.Process().memory_info().rss)


def peak_bytes(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = inputs(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = held_bytes(args.device)
    start = time.perf_counter()
    value = one_pass(args.worker, args, *tensors)
    sync()
    first_s = time.perf_counter() - start
    extra = peak_bytes(args.device) - before
    grads = [tensors[0].grad.double().norm().item(), tensors[1].grad.double().norm().item()]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_pass(args.worker, args, *tensors)
        sync()
        times.append(time.perf_counter() - start)
    return {"impl": args.worker, "peak_extra_bytes": extra, "first_s": first_s,
            "median_s": statistics.median(times) if times else first_s, "times_s": times,
            "loss": value, "grad_norms": grads}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    passed = [f"--rows={args.rows}", f"--vocab={args.vocab}", f"--d-student={args.d_student}",
              f"--d-teacher={args.d_teacher}", f"--dtype={args.dtype}", f"--kind={args.kind}",
              f"--device={args.device}", f"--repeats={args.repeats}", f"--threads={args.threads}"]  # fmt: skip
    results = {}
    for impl in ("unfused", "fused"):
        out = subprocess.run([sys.executable, __file__, *passed, "--worker", impl], capture_output=True,
                             text=True, check=True)  # fmt: skip
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    u, f = results["unfused"], results["fused"]
    shape = (f"N {args.rows}, V {args.vocab}, d_S {args.d_student}, d_T {args.d_teacher}, {args.dtype}, "
             f"{args.kind} + LM, {args.device}, chunk {default_chunk_rows(args.vocab, args.device)} rows")  # fmt: skip
    rel = abs(f["loss"] - u["loss"]) / abs(u["loss"])
    memory_ratio = f["peak_extra_bytes"] / u["peak_extra_bytes"]
    time_ratio = f["median_s"] / u["median_s"]
    print(f"logit + LM terms, forward + backward ({shape}); {date.today()}")
    print(f"  {'path':<8} {'peak extra MiB':>15} {'median s':>9} {'first s':>8}  loss")
    for r in (u, f):
        print(f"  {r['impl']:<8} {r['peak_extra_bytes'] / 2**20:>15.0f} {r['median_s']:>9.3f} "
              f"{r['first_s']:>8.3f}  {r['loss']:.6g}")  # fmt: skip
    print(f"  fused / unfused: peak extra memory {memory_ratio:.3f} (goal <= 0.25), time {time_ratio:.3f} "
          f"(goal <= 1.1); loss relative difference {rel:.2e}")  # fmt: skip
    one_vnv = args.rows * args.vocab * 4 / 2**20
    print(f"  (one (N, V) float32 tensor = {one_vnv:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": shape, "results": results, "memory_ratio": memory_ratio,
                       "time_ratio": time_ratio, "loss_rel_diff": rel}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
