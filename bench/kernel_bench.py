"""Benchmark: fused Triton correlation loss vs the eager torch reference, forward + backward.

    python bench/kernel_bench.py                       # GPU: N = 8 x 1024 tokens, d_T 4096, d_S 2048, bf16
    python bench/kernel_bench.py --dtype fp32 --valid-fraction 0.6 --iters 200
    python bench/kernel_bench.py --device cpu          # eager reference only, small shape

The eager reference is ``flexkd_ds.method.losses.correlation_loss`` (gather of the selected teacher columns into
an (N, d_S) float32 copy, centring, reductions; autograd backward). The fused path is
``flexkd_ds.method.ops.correlation_loss(impl="triton")``. Timings are medians of CUDA-event-timed iterations
after warm-up (the first warm-up call compiles the kernels).

Bytes the op must touch (N_valid rows used, N rows in the batch, b_T / b_S bytes per element):
    minimum = N_valid * d_S * (b_T + b_S)   selected teacher columns + student, read once
            + N * d_S * b_S                  student gradient, written once
The fused kernels read teacher columns and student twice (forward, then backward):
    kernel  = 2 * N_valid * d_S * (b_T + b_S) + N * d_S * b_S
DRAM moves 32-byte sectors: when the selected teacher columns are a large random share of d_T (d_S / d_T =
1/2 here) nearly every sector of each teacher row is fetched, so the true teacher traffic approaches
N_valid * d_T * b_T per pass; both figures above count only the selected columns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from flexkd_ds.method import ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Vendor peak HBM bandwidth by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def peak_gbps(name: str) -> float:
    return next((gbps for key, gbps in PEAK_GBPS.items() if key in name), 3350.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--batch", type=int, help="sequences (default 8 on GPU, 2 on CPU)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024 on GPU, 256 on CPU)")
    parser.add_argument("--d-teacher", type=int, help="teacher width d_T (default 4096 on GPU, 512 on CPU)")
    parser.add_argument("--d-student", type=int, help="student width d_S (default 2048 on GPU, 256 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="teacher and student dtype")
    parser.add_argument("--valid-fraction", type=float, default=1.0, help="share of valid tokens (mask)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--peak-gbps", type=float,
        help="HBM peak in GB/s (default: from the device name, PEAK_GBPS; else the H100 SXM's 3350)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_inputs(args, device):
    gen = torch.Generator().manual_seed(args.seed)
    lead = (args.batch, args.seq_len)
    teacher = torch.randn(*lead, args.d_teacher, generator=gen)
    units = torch.randperm(args.d_teacher, generator=gen)[: args.d_student]
    student = 0.5 * teacher[..., units] + torch.randn(*lead, args.d_student, generator=gen)
    mask = None
    if args.valid_fraction < 1.0:
        mask = (torch.rand(*lead, generator=gen) < args.valid_fraction).to(device)
    dtype = DTYPES[args.dtype]
    teacher = teacher.to(device, dtype)
    student = student.to(device, dtype).requires_grad_(True)
    return teacher, student, units.to(device), mask


def step(impl, teacher, student, units, mask):
    student.grad = None
    loss = ops.correlation_loss(teacher, student, units, mask, impl=impl)
    loss.backward()
    return loss


def time_cuda(impl, inputs, args) -> tuple[float, int]:
    """Median ms per forward + backward, and peak memory (bytes) above what was allocated before."""
    for _ in range(args.warmup):
        step(impl, *inputs)
    torch.cuda.synchronize()
    inputs[1].grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(impl, *inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def time_cpu(impl, inputs, args) -> float:
    for _ in range(args.warmup):
        step(impl, *inputs)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step(impl, *inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def traffic(args, mask) -> tuple[int, int]:
    """(minimum bytes, bytes the fused kernels move) as in the module docstring."""
    rows = args.batch * args.seq_len
    valid = rows if mask is None else int(mask.sum())
    b_elem = DTYPES[args.dtype].itemsize  # teacher and student share --dtype
    read_once = valid * args.d_student * (b_elem + b_elem)
    write = rows * args.d_student * b_elem
    return read_once + write, 2 * read_once + write


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    gpu = device == "cuda"
    if gpu and args.peak_gbps is None:
        args.peak_gbps = peak_gbps(torch.cuda.get_device_name())
    defaults = (8, 1024, 4096, 2048) if gpu else (2, 256, 512, 256)
    for name, value in zip(("batch", "seq_len", "d_teacher", "d_student"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    inputs = make_inputs(args, device)
    rows = args.batch * args.seq_len
    minimum, kernel_bytes = traffic(args, inputs[3])
    print(
        f"device {torch.cuda.get_device_name() if gpu else 'cpu'}; torch {torch.__version__}; "
        f"N = {args.batch} x {args.seq_len} = {rows} tokens (valid fraction {args.valid_fraction}), "
        f"d_T = {args.d_teacher}, d_S = {args.d_student}, {args.dtype}; {args.iters} iters after {args.warmup}"
    )
    print(
        f"bytes: minimum {minimum / 1e6:.1f} MB, fused kernels {kernel_bytes / 1e6:.1f} MB (formulas: see --help)"
    )

    if not gpu:
        eager_ms = time_cpu("torch", inputs, args)
        print(f"eager reference (fwd+bwd): {eager_ms:.3f} ms median on CPU")
        print(
            "fused Triton kernel: not timed. Without a CUDA device it can only run under TRITON_INTERPRET=1, a "
            "Python interpreter of the kernel that is orders of magnitude slower and says nothing about GPU "
            "speed. Run this script on a GPU for the comparison."
        )
        return 0

    fused_loss = step("triton", *inputs).detach()
    fused_grad = inputs[1].grad.clone()
    eager_loss = step("torch", *inputs).detach()
    eager_grad = inputs[1].grad.clone()
    scale = eager_grad.float().abs().max().clamp_min(1e-30)
    print(
        f"check: loss fused {float(fused_loss):.6g} vs eager {float(eager_loss):.6g}; "
        f"max |grad diff| / max |grad| = {float((fused_grad.float() - eager_grad.float()).abs().max() / scale):.2e}"
    )
    eager_ms, eager_peak = time_cuda("torch", inputs, args)
    fused_ms, fused_peak = time_cuda("triton", inputs, args)
    print(f"eager reference (fwd+bwd): {eager_ms:8.3f} ms   peak extra memory {eager_peak / 2**20:8.1f} MiB")
    print(f"fused Triton    (fwd+bwd): {fused_ms:8.3f} ms   peak extra memory {fused_peak / 2**20:8.1f} MiB")
    print(f"speed-up: {eager_ms / fused_ms:.2f}x (goal >= 3x)")
    for label, nbytes in (("minimum bytes", minimum), ("fused kernel bytes", kernel_bytes)):
        gbps = nbytes / (fused_ms * 1e-3) / 1e9
        print(
            f"fused, {label}: {gbps:7.1f} GB/s = {100 * gbps / args.peak_gbps:5.1f}% of {args.peak_gbps:.0f} GB/s"
        )
    print("(goal: >= 60% of peak HBM bandwidth; the student gradient, N x d_S, is in both memory figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
