"""Triton correlation kernel vs the torch reference (``flexkd_ds.method.losses``) and float64 textbook math.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set below before triton is imported);
shapes are small because the interpreter is slow. On a GPU machine run with ``TRITON_INTERPRET=0`` to
check the compiled kernels on CUDA tensors instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed; the kernel tests need it (CPU: interpreter)")

from flexkd_ds.kernels import correlation as kc  # noqa: E402
from flexkd_ds.method import losses, ops  # noqa: E402

if kc.INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "flexkd_ds.kernels.correlation was imported without TRITON_INTERPRET=1 and there is no GPU",
        allow_module_level=True,
    )

# Per input dtype: (moments rtol, loss rtol, student-gradient rtol). Moments and loss are fp32 math on the
# same (upcast) values in both paths; the gradient is rounded to the student's dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5, 2e-3),
    torch.bfloat16: (1e-5, 1e-5, 1e-2),
}


def assert_close(actual, expected, *, rtol, atol=0.0, name="tensor"):
    """|actual - expected| <= atol + rtol |expected| elementwise; on failure print where they differ."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs()
    bad = ~(error <= atol + rtol * expected.abs())  # NaN counts as bad
    if bad.any():
        where = bad.nonzero()[:8].tolist()
        lines = [f"  at {tuple(i)}: got {actual[tuple(i)]:.8g}, want {expected[tuple(i)]:.8g}" for i in where]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} values differ (rtol={rtol}, atol={atol}, "
            f"max abs error {error.max():.3g})\n" + "\n".join(lines)
        )


def assert_moments_close(actual, expected, rtol, name="moments"):
    """Row by row, with atol scaled to the row's magnitude (means can sit near zero)."""
    for row, label in enumerate(losses.MOMENT_NAMES):
        scale = float(expected[row].abs().max())
        assert_close(actual[row], expected[row], rtol=rtol, atol=rtol * scale, name=f"{name}[{label}]")


def make_inputs(lead, d_teacher, d_student, dtype=torch.float32, seed=0, correlation=0.6):
    """Teacher (*lead, d_T), student (*lead, d_S) partly correlated with the selected teacher columns."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*lead, d_teacher, generator=gen) * 1.5 + torch.randn(d_teacher, generator=gen)
    units = torch.randperm(d_teacher, generator=gen)[:d_student]
    noise = torch.randn(*lead, d_student, generator=gen)
    student = correlation * teacher[..., units] + (1 - correlation) * noise + 0.3
    return teacher.to(DEVICE, dtype), student.to(DEVICE, dtype), units.to(DEVICE)


def textbook(teacher, student, units, mask=None, eps=1e-6):
    """float64 moments (6, d_S) and loss straight from the definition."""
    t = teacher.double().reshape(-1, teacher.shape[-1])
    s = student.double().reshape(-1, student.shape[-1])
    if mask is not None:
        t, s = t[mask.reshape(-1)], s[mask.reshape(-1)]
    t = t[:, units]
    tc, sc = t - t.mean(0), s - s.mean(0)
    corr = (tc * sc).sum(0) / (tc.norm(dim=0).clamp_min(eps) * sc.norm(dim=0).clamp_min(eps))
    count = torch.full_like(corr, float(t.shape[0]))
    moments = torch.stack([count, t.mean(0), s.mean(0), (tc * tc).sum(0), (sc * sc).sum(0), (tc * sc).sum(0)])
    return moments, ((1 - corr) ** 2).sum()


def loss_and_grad(fn, teacher, student, units, mask, scale=3.7):
    """Loss, and the student gradient of ``scale * loss`` (grad_output != 1)."""
    student = student.detach().clone().requires_grad_(True)
    loss = fn(teacher, student, units, mask)
    (loss * scale).backward()
    return loss.detach(), student.grad


def triton_loss(teacher, student, units, mask, **kwargs):
    return ops.correlation_loss(teacher, student, units, mask, impl="triton", **kwargs)


def check_against_reference(
    teacher, student, units, mask=None, dtype=torch.float32, check_grad=True, **launch
):
    rtol_moments, rtol_loss, rtol_grad = TOLERANCES[dtype]
    moments = kc.correlation_moments_triton(teacher, student, units, mask, **launch)
    assert moments.dtype == torch.float32 and moments.shape == (6, student.shape[-1])
    reference = losses.correlation_moments(teacher, student, units, mask)
    assert_moments_close(moments, reference, rtol_moments, "vs reference")
    exact, exact_loss = textbook(teacher, student, units, mask)
    assert_moments_close(moments, exact, rtol_moments, "vs float64")

    def fused(t, s, u, m):
        return losses.correlation_from_moments(kc.correlation_moments_triton(t, s, u, m, **launch))[0]

    loss, grad = loss_and_grad(fused, teacher, student, units, mask)
    ref_loss, ref_grad = loss_and_grad(losses.correlation_loss, teacher, student, units, mask)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert torch.isfinite(grad).all()
    if mask is not None:
        assert (grad.reshape(-1, grad.shape[-1])[~mask.reshape(-1)] == 0).all(), "masked rows got gradient"
    assert_close(loss, ref_loss, rtol=rtol_loss, name="loss vs reference")
    assert_close(loss, exact_loss, rtol=rtol_loss, name="loss vs float64")
    if not check_grad:
        return moments
    grad_scale = float(ref_grad.abs().max())
    assert_close(grad, ref_grad, rtol=rtol_grad, atol=rtol_grad * grad_scale, name="grad vs reference")

    student64 = student.detach().double().requires_grad_(True)
    (textbook(teacher, student64, units, mask)[1] * 3.7).backward()
    grad_tol = max(rtol_grad, 1e-4)  # fp32 vs float64 derivative of a sum of 77 squares
    assert_close(grad, student64.grad, rtol=grad_tol, atol=grad_tol * grad_scale, name="grad vs float64")
    return moments


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(37,), (3, 37)], ids=["2d", "3d"])
def test_awkward_shapes_match_reference_and_float64(lead, dtype):
    teacher, student, units = make_inputs(lead, 301, 77, dtype)
    check_against_reference(teacher, student, units, dtype=dtype)


def test_chan_merge_across_tiles_and_splits():
    teacher, student, units = make_inputs((4, 75), 96, 40, seed=1)
    mask = torch.rand(4, 75, generator=torch.Generator().manual_seed(2)) > 0.2
    mask = mask.to(DEVICE)
    for num_splits in (1, 4, 7):  # 16-row tiles: several tiles per split, uneven last split
        check_against_reference(
            teacher, student, units, mask, num_splits=num_splits, block_rows=16, block_cols=32
        )
    first = kc.correlation_moments_triton(teacher, student, units, mask, num_splits=7, block_rows=16)
    again = kc.correlation_moments_triton(teacher, student, units, mask, num_splits=7, block_rows=16)
    assert torch.equal(first, again), "no atomics: the same launch must give bitwise identical moments"


def test_tiles_and_splits_without_a_valid_row_merge_as_nothing():
    # 300 flat rows in 16-row tiles and 5 splits of 60: rows 20..139 masked out covers whole tiles and the
    # whole second split, so some programs see no valid row at all and others start on empty tiles.
    teacher, student, units = make_inputs((4, 75), 96, 40, seed=11)
    mask = torch.ones(300, dtype=torch.bool)
    mask[20:140] = False
    mask[200:203] = False  # and a partly masked tile
    mask = mask.reshape(4, 75).to(DEVICE)
    for num_splits in (1, 5):
        moments = check_against_reference(
            teacher, student, units, mask, num_splits=num_splits, block_rows=16, block_cols=32
        )
        assert (moments[0] == int(mask.sum())).all()


def test_the_fused_path_never_lists_the_valid_rows_on_the_host():
    """The valid rows go to the kernels as a mask: no nonzero / boolean indexing / .item() (each makes the
    host wait for a GPU) in the forward or the backward; the values stay the reference's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    host_reads = {"aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::index.Tensor"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            overload = "" if func._overloadname == "default" else "." + func._overloadname
            self.seen.append(func._schema.name + overload)
            return func(*args, **(kwargs or {}))

    teacher, student, units = make_inputs((3, 37), 60, 24, seed=12)
    mask = (torch.rand(3, 37, generator=torch.Generator().manual_seed(13)) > 0.4).to(DEVICE)
    student = student.requires_grad_(True)
    with Record() as record:
        moments = kc.correlation_moments_triton(teacher, student, units, mask, validate=False)
        weights = torch.arange(1.0, 7.0, device=DEVICE)[:, None]
        (grad,) = torch.autograd.grad((moments * weights).sum(), student)
    assert record.seen, "the recorder saw no operator at all"
    host_waits = sorted(host_reads & set(record.seen))
    assert not host_waits, f"the fused path read device values on the host: {host_waits}"
    reference = losses.correlation_moments(teacher, student, units, mask)
    assert_moments_close(moments, reference.detach(), TOLERANCES[torch.float32][0])
    weights = torch.arange(1.0, 7.0, device=DEVICE)[:, None]
    (ref_grad,) = torch.autograd.grad((reference * weights).sum(), student)
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()), name="grad")


def test_non_contiguous_layouts():
    teacher, student, units = make_inputs((2, 19), 53, 21, seed=3)
    # (B, d_T, T) storage seen as (B, T, d_T): unit stride on the token axis, not on the feature axis.
    transposed = teacher.transpose(1, 2).contiguous().transpose(1, 2)
    check_against_reference(transposed, student, units)
    # A strided slice out of a wider, longer buffer; int32 indices.
    wide = torch.zeros(2, 2 * 19, 60, device=DEVICE)
    wide[:, ::2, 4:57] = teacher
    sliced = wide[:, ::2, 4:57]
    assert not sliced.is_contiguous()
    check_against_reference(sliced, student, units.to(torch.int32))
    # Transposed student: the gradient comes back in the student's layout.
    student_t = student.transpose(0, 1).contiguous().transpose(0, 1)
    moments = kc.correlation_moments_forward(teacher, student_t, units)
    grad = kc.correlation_moments_backward(torch.ones_like(moments), moments, teacher, student_t, units)
    assert grad.stride() == student_t.stride()
    check_against_reference(teacher, student_t, units)


def test_rank4_inputs_view_and_reshape_fallback():
    teacher, student, units = make_inputs((2, 3, 5), 33, 12, seed=4)
    mask = (torch.arange(30).reshape(2, 3, 5) % 4 != 1).to(DEVICE)
    check_against_reference(teacher, student, units, mask)  # viewed as (6, 5, d)
    not_viewable = teacher.transpose(1, 2).contiguous().transpose(1, 2)  # (2, 3, 5, d), strides break view
    with pytest.raises(RuntimeError):
        not_viewable.view(-1, 5, 33)
    check_against_reference(not_viewable, student, units, mask)


def test_masked_rows_and_only_two_valid():
    teacher, student, units = make_inputs((3, 37), 301, 77, seed=5)
    mask = (torch.rand(3, 37, generator=torch.Generator().manual_seed(6)) > 0.5).to(DEVICE)
    check_against_reference(teacher, student, units, mask)
    two = torch.zeros(3, 37, dtype=torch.bool, device=DEVICE)
    two[0, 5] = two[2, 30] = True
    # With two rows every C_m is exactly +-1, a flat point: the true gradient is 0 and both paths return
    # fp32 rounding noise there, so only moments, loss and the zero gradient of masked rows are compared.
    moments = check_against_reference(teacher, student, units, two, check_grad=False)
    assert (moments[0] == 2).all()


def test_all_masked():
    teacher, student, units = make_inputs((2, 9), 20, 8, seed=7)
    none = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    student = student.requires_grad_(True)
    moments = kc.correlation_moments_triton(teacher, student, units, none)
    assert torch.equal(moments, torch.zeros(6, 8, device=DEVICE)), "reference semantics: zeros, count 0"
    (grad,) = torch.autograd.grad(moments.sum(), student)
    assert torch.equal(grad, torch.zeros_like(student))
    with pytest.raises(ValueError, match="at least 2 valid rows") as reference:
        losses.correlation_loss(teacher, student, units, none)
    with pytest.raises(ValueError) as fused:
        triton_loss(teacher, student, units, none)
    assert str(fused.value) == str(reference.value)


def test_massive_activation_columns_match_float64():
    gen = torch.Generator().manual_seed(8)
    rows, d_teacher, d_student = 200, 48, 16
    teacher = torch.randn(rows, d_teacher, generator=gen)
    units = torch.randperm(d_teacher, generator=gen)[:d_student]
    heavy = units[:6]
    teacher[:, heavy] = 500.0 + 0.5 * torch.randn(rows, 6, generator=gen)  # LLaMA-style massive activations
    student = 0.5 * teacher[:, units] + 0.5 * torch.randn(rows, d_student, generator=gen)
    student[:, 8:] = -300.0 + 0.3 * torch.randn(rows, 8, generator=gen)  # heavy student columns too
    teacher, student, units = teacher.to(DEVICE), student.to(DEVICE), units.to(DEVICE)

    # The case is hard: the raw sum(x^2) - sum(x)^2 / n in fp32 is badly off for these columns.
    t = teacher[:, heavy]
    naive = (t * t).sum(0) - t.sum(0) ** 2 / rows
    exact = ((t.double() - t.double().mean(0)) ** 2).sum(0)
    assert ((naive.double() - exact).abs() / exact).max() > 1e-2

    check_against_reference(teacher, student, units, block_rows=16, num_splits=3)
    moments = kc.correlation_moments_triton(teacher, student, units, block_rows=16, num_splits=3)
    corr = losses.correlation_from_moments(moments)[1]
    exact_moments, _ = textbook(teacher, student, units)
    exact_corr = exact_moments[5] / (exact_moments[3] * exact_moments[4]).sqrt()
    assert_close(corr, exact_corr, rtol=0, atol=1e-5, name="correlation vs float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_default_tiles(dtype):
    """The GPU's default tile (chosen on an H200), forced here so the interpreter checks it too: several row
    tiles per split, a partial column block, masked rows, and a split boundary inside a tile."""
    rows, cols = kc._GPU_BLOCK_ROWS, kc._GPU_BLOCK_COLS
    teacher, student, units = make_inputs((3, rows + 5), cols + 24, cols + 8, dtype=dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    mask = (torch.rand(3, rows + 5, generator=gen) < 0.8).to(DEVICE)
    check_against_reference(
        teacher, student, units, mask, dtype=dtype, block_rows=rows, block_cols=cols, num_splits=2
    )


BAD_INPUTS = {
    "rank1": lambda t, s, u, m: (t[0, 0], s[0, 0], u, None),
    "lead-mismatch": lambda t, s, u, m: (t, s[:, :5], u, None),
    "len-indices": lambda t, s, u, m: (t, s, u[:-1], None),
    "float-indices": lambda t, s, u, m: (t, s, u.float(), None),
    "out-of-range": lambda t, s, u, m: (t, s, torch.cat([u[:-1], u.new_tensor([t.shape[-1]])]), None),
    "negative": lambda t, s, u, m: (t, s, torch.cat([u[:-1], u.new_tensor([-1])]), None),
    "duplicates": lambda t, s, u, m: (t, s, torch.cat([u[:-1], u[:1]]), None),
    "mask-shape": lambda t, s, u, m: (t, s, u, m[:, :3]),
    "mask-dtype": lambda t, s, u, m: (t, s, u, m.float()),
    "one-row": lambda t, s, u, m: (t, s, u, torch.arange(m.numel(), device=m.device).reshape(m.shape) == 3),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_like_reference(case):
    teacher, student, units = make_inputs((2, 7), 15, 6, seed=9)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    args = BAD_INPUTS[case](teacher, student, units, mask)
    with pytest.raises(ValueError) as reference:
        losses.correlation_loss(*args)
    with pytest.raises(ValueError) as fused:
        triton_loss(*args)
    assert str(fused.value) == str(reference.value)


def test_unsupported_dtype_on_triton_path():
    teacher, student, units = make_inputs((2, 7), 15, 6, dtype=torch.float64, seed=10)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        triton_loss(teacher, student, units, None)
    assert ops.resolve_impl("auto", student) == "torch"


def test_impl_resolution(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("FLEXKD_IMPL", raising=False)
    assert ops.resolve_impl("auto", cpu) == "torch"
    assert ops.resolve_impl("torch", cpu) == "torch"
    monkeypatch.setenv("FLEXKD_IMPL", "triton")
    if kc.INTERPRETED:
        assert ops.resolve_impl("auto", cpu) == "triton"
    else:  # compiled kernels (a GPU machine): the variable asks for triton, which cannot take CPU tensors
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.resolve_impl("auto", cpu)
    assert ops.resolve_impl("torch", cpu) == "torch", "the variable overrides 'auto' only"
    monkeypatch.setenv("FLEXKD_IMPL", "torch")
    assert ops.resolve_impl("auto", cpu) == "torch"
    monkeypatch.setenv("FLEXKD_IMPL", "cuda-graphs")
    with pytest.raises(ValueError, match="FLEXKD_IMPL"):
        ops.resolve_impl("auto", cpu)
    monkeypatch.delenv("FLEXKD_IMPL")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.resolve_impl("liger", cpu)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.correlation_loss(*make_inputs((2, 7), 15, 6), impl="Triton")
    monkeypatch.setattr(kc, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_impl("triton", cpu)
    monkeypatch.setitem(sys.modules, "flexkd_ds.kernels.correlation", None)  # the import now fails
    monkeypatch.delattr(sys.modules["flexkd_ds.kernels"], "correlation")
    with pytest.raises(RuntimeError, match="working triton"):
        ops.resolve_impl("triton", cpu)
    assert ops.resolve_impl("auto", cpu) == "torch"


def test_torch_impl_is_the_reference():
    teacher, student, units = make_inputs((3, 11), 40, 9, seed=11)
    mask = (torch.arange(33).reshape(3, 11) % 5 != 0).to(DEVICE)
    got = ops.correlation_loss(teacher, student, units, mask, impl="torch")
    assert torch.equal(got, losses.correlation_loss(teacher, student, units, mask))
    moments = ops.correlation_moments(teacher, student, units, mask, impl="triton")
    assert_moments_close(moments, losses.correlation_moments(teacher, student, units, mask), 1e-5)


def test_ops_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from flexkd_ds.method import ops\n"
        "t, s, u = torch.randn(6, 8), torch.randn(6, 4), torch.arange(4)\n"
        "assert ops.resolve_impl('auto', s) == 'torch'\n"
        "print(float(ops.correlation_loss(t, s, u)))\n"
        "try:\n    ops.correlation_loss(t, s, u, impl='triton')\nexcept RuntimeError as e:\n"
        "    assert 'working triton' in str(e)\nelse:\n    raise SystemExit('no RuntimeError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FLEXKD_IMPL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_global_scope_all_reduce_matches_single_process():
    teacher, student, units = make_inputs((4, 23), 70, 30, seed=12)
    mask = (torch.rand(4, 23, generator=torch.Generator().manual_seed(13)) > 0.25).to(DEVICE)
    whole_loss, whole_grad = loss_and_grad(triton_loss, teacher, student, units, mask)
    exact_loss = textbook(teacher, student, units, mask)[1]
    assert_close(whole_loss, exact_loss, rtol=1e-5, name="single-process loss vs float64")

    world = 2
    barrier = threading.Barrier(world, timeout=60)
    slots = [None] * world
    # The interpreter is not thread-safe: kernel launches take turns. A rank holds `launch` through its
    # forward kernel and lets go at its first collective (its kernel work is done by then).
    launch = threading.Lock()
    results, errors = [None] * world, []

    def make_all_reduce(rank, held):
        def all_reduce(tensor):
            if held:
                held.pop()
                launch.release()
            slots[rank] = tensor
            barrier.wait()
            total = sum(slots[1:], slots[0]).clone()
            barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total

        return all_reduce

    def rank_main(rank):
        try:
            rows = slice(2 * rank, 2 * rank + 2)  # each rank holds two sequences
            local = student[rows].detach().clone().requires_grad_(True)
            launch.acquire()
            held = [True]
            loss = triton_loss(
                teacher[rows], local, units, mask[rows], all_reduce=make_all_reduce(rank, held)
            )
            with launch:
                (loss * 3.7).backward()
            results[rank] = (loss.detach(), local.grad)
        except BaseException as error:  # surface thread failures in the test
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for rank, (loss, grad) in enumerate(results):
        assert_close(loss, whole_loss, rtol=1e-5, name=f"rank {rank} loss")
        expected = whole_grad[2 * rank : 2 * rank + 2]
        scale = float(whole_grad.abs().max())
        assert_close(grad, expected, rtol=1e-5, atol=1e-5 * scale, name=f"rank {rank} grad")
