"""Sweep the GPU launch parameters the CPU cannot choose: the correlation kernels' tiles and the logit chunk size.

    python bench/gpu_tune.py                      # both sweeps at the paper's shapes (bf16), about 2 minutes
    python bench/gpu_tune.py --only kernel        # the correlation kernels alone
    python bench/gpu_tune.py --only chunks        # the chunked logit loss alone

kernel: N = 8 x 1024 rows, d_T 4096, d_S 2048 (``bench/kernel_bench.py``'s shape). Times (``triton.testing.
do_bench``, median ms) of the forward and the backward kernel alone for each (BLOCK_R, BLOCK_D, num_warps),
at the row splits ``_num_splits`` picks and at twice them; then the whole ``ops.correlation_loss``
forward + backward (Triton and eager torch) with the trainer's flags (``units_checked=True``,
``check_rows=False``) and with the checks on, and the reference copies a kernel cannot beat (the gather
``teacher[..., units]`` alone, reading the student once). Bandwidth = bytes of the selected teacher columns +
the student (+ the student gradient in backward) / time.

chunks: ``fused_linear_divergence`` (rkl + LM, N 8192, d_S 2048, d_T 4096, V 50272 and 32000) forward + backward
at chunk_rows 256 ... 4096: median ms and peak extra memory, against whole logits.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import triton.testing  # binds triton too (triton.cdiv)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["kernel", "chunks"])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    return p.parse_args(argv)


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60))


def kernel_sweep(dtype) -> None:
    from flexkd_ds.kernels import correlation as kc
    from flexkd_ds.method import ops

    dev, (b, t, d_t, d_s) = "cuda", (8, 1024, 4096, 2048)
    g = torch.Generator(device=dev).manual_seed(0)
    teacher = torch.randn(b, t, d_t, device=dev, generator=g).to(dtype)
    student = torch.randn(b, t, d_s, device=dev, generator=g).to(dtype).requires_grad_(True)
    units = torch.randperm(d_t, device=dev, generator=g)[:d_s]
    n, e = b * t, teacher.element_size()
    fwd_bytes, bwd_bytes = n * d_s * 2 * e, n * d_s * 3 * e
    moments = kc.correlation_moments_forward(teacher, student.detach(), units)
    grad = torch.randn(6, d_s, device=dev, generator=g)
    print(f"kernel sweep: N {n}, d_T {d_t}, d_S {d_s}, {dtype}; {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")  # fmt: skip
    print(f"  reference: gather teacher[..., units] {bench_ms(lambda: teacher.index_select(-1, units)):.3f} ms; "
          f"student.sum(0..1) {bench_ms(lambda: student.detach().sum((0, 1))):.3f} ms")  # fmt: skip
    default = kc._launch_config(student.device)
    print(f"  defaults: BLOCK_R {default[0]}, BLOCK_D {default[1]}, warps {default[2]}, "
          f"splits {kc._num_splits(n, triton.cdiv(d_s, default[1]), default[0], student.device)}")  # fmt: skip
    print(f"  {'R':>3} {'D':>4} {'w':>2} {'splits':>6} {'fwd ms':>8} {'GB/s':>6} {'bwd ms':>8} {'GB/s':>6}")
    results = []
    warps0 = kc._GPU_NUM_WARPS
    for block_r, block_d, warps in itertools.product((16, 32, 64), (64, 128, 256), (4, 8)):
        kc._GPU_NUM_WARPS = warps
        base = kc._num_splits(n, triton.cdiv(d_s, block_d), block_r, student.device)
        for splits in (base, base * 2):
            opts = dict(block_rows=block_r, block_cols=block_d, num_splits=splits)
            try:
                f_ms = bench_ms(lambda o=opts: kc.correlation_moments_forward(
                    teacher, student.detach(), units, **o))  # fmt: skip
                b_ms = bench_ms(lambda o=opts: kc.correlation_moments_backward(
                    grad, moments, teacher, student.detach(), units, **o))  # fmt: skip
            except Exception as err:  # out of resources for this tile: skip it
                print(f"  {block_r:>3} {block_d:>4} {warps:>2} {splits:>6}  failed: {type(err).__name__}")
                continue
            results.append((f_ms + b_ms, block_r, block_d, warps, splits, f_ms, b_ms))
            print(f"  {block_r:>3} {block_d:>4} {warps:>2} {splits:>6} {f_ms:8.3f} {fwd_bytes / f_ms / 1e6:6.0f} "
                  f"{b_ms:8.3f} {bwd_bytes / b_ms / 1e6:6.0f}")  # fmt: skip
    kc._GPU_NUM_WARPS = warps0
    results.sort()
    print("  best 8 (fwd + bwd ms, R, D, warps, splits, fwd, bwd):")
    for row in results[:8]:
        print("   ", " ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in row))

    def whole(impl, checked):
        student.grad = None
        ops.correlation_loss(teacher, student, units, impl=impl, units_checked=checked,
                             check_rows=not checked).backward()  # fmt: skip

    for impl, checked in (("triton", True), ("torch", True), ("triton", False), ("torch", False)):
        print(f"  ops.correlation_loss fwd+bwd impl={impl} checks {'off' if checked else 'on '}: "
              f"{bench_ms(lambda i=impl, c=checked: whole(i, c)):.3f} ms")  # fmt: skip
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            whole("triton", True)
        torch.cuda.synchronize()
    try:
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12))
    except Exception:  # older torch names the column after CUDA
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def chunk_sweep(dtype) -> None:
    import sys
    from pathlib import Path

    from flexkd_ds.method.fused_logits import default_chunk_rows

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from logit_memory import one_pass  # the same pass bench/logit_memory.py measures

    rkl = argparse.Namespace(kind="rkl")

    def logit_pass(chunk, *tensors):
        one_pass("unfused" if chunk is None else "fused", rkl, *tensors, chunk_rows=chunk)

    dev, n, d_s, d_t = "cuda", 8192, 2048, 4096
    for vocab in (50272, 32000):
        g = torch.Generator(device=dev).manual_seed(0)
        tensors = (
            torch.randn(n, d_s, device=dev, generator=g).to(dtype).requires_grad_(True),
            (torch.randn(vocab, d_s, device=dev, generator=g) * d_s**-0.5).to(dtype).requires_grad_(True),
            torch.randn(n, d_t, device=dev, generator=g).to(dtype),
            (torch.randn(vocab, d_t, device=dev, generator=g) * d_t**-0.5).to(dtype),
            torch.randint(0, vocab, (n,), device=dev, generator=g),
        )
        print(f"chunk sweep: N {n}, V {vocab}, d_S {d_s}, d_T {d_t}, {dtype}, rkl + LM; default chunk "
              f"{default_chunk_rows(vocab, 'cuda')} rows")  # fmt: skip
        for chunk in (None, 256, 512, 1024, 2048, 4096):
            logit_pass(chunk, *tensors)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            logit_pass(chunk, *tensors)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            times = []
            for _ in range(7):
                start = time.perf_counter()
                logit_pass(chunk, *tensors)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            label = "whole logits" if chunk is None else f"chunk {chunk}"
            print(f"  {label:>13}: {statistics.median(times):8.2f} ms  peak extra {peak:8.0f} MiB")
        del tensors
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if not torch.cuda.is_available():
        raise SystemExit("gpu_tune.py needs a CUDA device")
    if args.only in (None, "kernel"):
        kernel_sweep(dtype)
    if args.only in (None, "chunks"):
        chunk_sweep(dtype)


if __name__ == "__main__":
    main()
