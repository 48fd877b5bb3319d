"""Correlation loss reference (flexkd_ds.method.losses) against a float64 textbook Pearson written out here."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch

from flexkd_ds.method.losses import (
    MOMENT_NAMES,
    combine_moments,
    correlation_from_moments,
    correlation_loss,
    correlation_moments,
)

EPS = 1e-6


def textbook_pearson_loss(teacher, student, unit_indices, valid_mask=None, eps=EPS):
    """sum_m (1 - C_m)^2 in float64 with explicit per-column centring; also returns the list of C_m."""
    d_t, d_s = teacher.shape[-1], student.shape[-1]
    t_rows = teacher.detach().double().reshape(-1, d_t)
    s_rows = student.detach().double().reshape(-1, d_s)
    if valid_mask is not None:
        keep = [i for i, v in enumerate(valid_mask.reshape(-1).tolist()) if v]
        t_rows, s_rows = t_rows[keep], s_rows[keep]
    loss, corrs = 0.0, []
    for m in range(d_s):
        t = t_rows[:, int(unit_indices[m])]
        s = s_rows[:, m]
        t_c = t - t.sum() / t.numel()
        s_c = s - s.sum() / s.numel()
        norm_t = max(math.sqrt(float((t_c * t_c).sum())), eps)
        norm_s = max(math.sqrt(float((s_c * s_c).sum())), eps)
        c = float((t_c * s_c).sum()) / (norm_t * norm_s)
        corrs.append(c)
        loss += (1.0 - c) ** 2
    return loss, corrs


def make_inputs(shape=(3, 7), d_t=10, d_s=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*shape, d_t, generator=g, dtype=torch.float64)
    # the student partly follows the selected teacher units, so the correlations are far from 0
    unit_indices = torch.randperm(d_t, generator=g)[:d_s]
    student = 0.7 * teacher[..., unit_indices] + torch.randn(*shape, d_s, generator=g, dtype=torch.float64)
    student = student * torch.linspace(0.5, 3.0, d_s, dtype=torch.float64) + 2.0  # non-unit scale and offset
    return teacher.to(dtype), student.to(dtype), unit_indices


def random_mask(shape, seed=1, min_valid=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.35
    mask.reshape(-1)[:min_valid] = True
    return mask


def test_loss_matches_textbook_pearson_btd_with_mask():
    teacher, student, idx = make_inputs(shape=(3, 7))
    mask = random_mask((3, 7))
    assert 2 < int(mask.sum()) < mask.numel()  # the mask really drops rows
    expected, _ = textbook_pearson_loss(teacher, student, idx, mask)
    got = correlation_loss(teacher, student, idx, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # ignoring the mask gives a different value: the mask is honoured, not silently dropped
    unmasked, _ = textbook_pearson_loss(teacher, student, idx)
    assert abs(unmasked - expected) > 1e-3


def test_loss_matches_textbook_pearson_nd_without_mask():
    teacher, student, idx = make_inputs(shape=(25,), d_t=6, d_s=3, seed=3)
    expected, _ = textbook_pearson_loss(teacher, student, idx)
    assert correlation_loss(teacher, student, idx).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_float64_input_is_exact_and_stays_float64():
    teacher, student, idx = make_inputs(dtype=torch.float64, seed=5)
    mask = random_mask((3, 7), seed=6)
    got = correlation_loss(teacher, student, idx, mask)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(textbook_pearson_loss(teacher, student, idx, mask)[0], rel=1e-12)


def test_correlations_from_moments_match_textbook_pearson():
    teacher, student, idx = make_inputs(dtype=torch.float64, seed=7)
    mask = random_mask((3, 7), seed=8)
    loss, corr = correlation_from_moments(correlation_moments(teacher, student, idx, mask), eps=EPS)
    expected_loss, expected_corr = textbook_pearson_loss(teacher, student, idx, mask)
    assert torch.allclose(corr, torch.tensor(expected_corr, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)


def test_non_contiguous_teacher_views():
    teacher, student, idx = make_inputs(shape=(4, 6), d_t=12, d_s=3, seed=9)
    mask = random_mask((4, 6), seed=10)
    expected, _ = textbook_pearson_loss(teacher, student, idx, mask)
    # a transposed view: stored (T, B, d_T), seen as (B, T, d_T)
    transposed = teacher.transpose(0, 1).contiguous().transpose(0, 1)
    assert not transposed.is_contiguous()
    # a strided slice: every other unit of a (B, T, 2 d_T) buffer
    wide = torch.zeros(4, 6, 24)
    wide[..., ::2] = teacher
    sliced = wide[..., ::2]
    assert not sliced.is_contiguous()
    for view in (transposed, sliced):
        got = correlation_loss(view, student, idx, mask)
        assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_gradcheck_float64():
    teacher, student, idx = make_inputs(shape=(2, 5), d_t=7, d_s=3, dtype=torch.float64, seed=11)
    mask = random_mask((2, 5), seed=12, min_valid=3)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: correlation_loss(teacher, s, idx, mask), (student,))


def test_gradient_matches_textbook_pearson_under_autograd():
    # an independent gradient: autograd through the explicit float64 formula, built from torch ops
    teacher, student, idx = make_inputs(shape=(3, 5), d_t=8, d_s=3, dtype=torch.float64, seed=13)
    mask = random_mask((3, 5), seed=14)
    s_ref = student.clone().requires_grad_(True)
    t_rows, s_rows = teacher[mask][:, idx], s_ref[mask]
    t_c = t_rows - t_rows.sum(0) / t_rows.shape[0]
    s_c = s_rows - s_rows.sum(0) / s_rows.shape[0]
    corr = (t_c * s_c).sum(0) / ((t_c**2).sum(0).sqrt() * (s_c**2).sum(0).sqrt())
    ((1 - corr) ** 2).sum().backward()
    s_code = student.clone().requires_grad_(True)
    correlation_loss(teacher, s_code, idx, mask).backward()
    assert torch.allclose(s_code.grad, s_ref.grad, rtol=1e-10, atol=1e-12)
    assert s_code.grad[~mask].abs().max() == 0  # masked rows get no gradient


def test_teacher_gets_no_gradient():
    teacher, student, idx = make_inputs()
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    correlation_loss(teacher, student, idx).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "case, match",
    [
        ("too_few_indices", "len\\(unit_indices\\)"),
        ("too_many_indices", "len\\(unit_indices\\)"),
        ("index_too_large", "unit_indices must lie in"),
        ("negative_index", "unit_indices must lie in"),
        ("duplicates", "duplicate"),
        ("float_indices", "unit_indices must be a 1-D integer"),
        ("2d_indices", "unit_indices must be a 1-D integer"),
        ("shape_mismatch", "must agree in every dimension"),
        ("mask_shape", "valid_mask"),
        ("mask_dtype", "valid_mask must be a bool"),
        ("one_valid_row", "at least 2 valid rows"),
        ("all_masked", "at least 2 valid rows"),
    ],
)
def test_value_errors(case, match):
    teacher, student, idx = make_inputs(shape=(3, 7), d_t=10, d_s=4)
    mask = None
    if case == "too_few_indices":
        idx = idx[:3]
    elif case == "too_many_indices":
        idx = torch.tensor([0, 1, 2, 3, 4])
    elif case == "index_too_large":
        idx = torch.tensor([0, 1, 2, 10])
    elif case == "negative_index":
        idx = torch.tensor([0, 1, -1, 3])
    elif case == "duplicates":
        idx = torch.tensor([0, 1, 1, 3])
    elif case == "float_indices":
        idx = idx.float()
    elif case == "2d_indices":
        idx = idx.reshape(2, 2)
    elif case == "shape_mismatch":
        student = student[:, :6]
    elif case == "mask_shape":
        mask = torch.ones(3, 6, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(3, 7, dtype=torch.int64)
    elif case == "one_valid_row":
        mask = torch.zeros(3, 7, dtype=torch.bool)
        mask[1, 2] = True
    elif case == "all_masked":
        mask = torch.zeros(3, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        correlation_loss(teacher, student, idx, mask)


@pytest.mark.parametrize("value", [2.0, 3.7])
def test_constant_student_column_gives_zero_correlation_and_finite_gradient(value):
    # 2.0: the centred column is exactly 0 and only the eps guard avoids 0 / 0;
    # 3.7: not representable, the float32 mean is rounded and the centred column is ~1e-7, not 0
    teacher, student, idx = make_inputs(shape=(4, 6), seed=15)
    student[..., 1] = value  # a dead student unit
    student.requires_grad_(True)
    moments = correlation_moments(teacher, student, idx)
    loss, corr = correlation_from_moments(moments, eps=EPS)
    assert torch.isfinite(corr).all() and abs(corr[1].item()) < 1e-6
    expected, expected_corr = textbook_pearson_loss(teacher, student, idx)
    assert expected_corr[1] == 0.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # the dead unit gets no gradient (a 1/eps-sized one would dominate any clipped update)
    assert student.grad[..., 1].abs().max().item() == 0.0
    assert student.grad.abs().max().item() < 10.0


def _massive_activation_inputs(num_rows=8192, d_s=4, seed=16):
    g = torch.Generator().manual_seed(seed)
    # teacher units of mean 500 and std 0.5 (LLaMA-style massive activations), stored in float32
    teacher64 = 500.0 + 0.5 * torch.randn(num_rows, d_s, generator=g, dtype=torch.float64)
    teacher = teacher64.float()
    student = (0.8 * (teacher.double() - 500.0) + 0.3 * torch.randn(num_rows, d_s, generator=g)).float()
    return teacher, student, torch.arange(d_s)


def test_massive_activations_float32_agrees_with_float64():
    teacher, student, idx = _massive_activation_inputs()
    expected, expected_corr = textbook_pearson_loss(teacher, student, idx)
    assert correlation_loss(teacher, student, idx).item() == pytest.approx(expected, rel=1e-4)
    _, corr = correlation_from_moments(correlation_moments(teacher, student, idx))
    assert torch.allclose(corr.double(), torch.tensor(expected_corr, dtype=torch.float64), rtol=1e-4)


def test_naive_sum_of_squares_fails_on_the_same_massive_activations():
    # The formula the reference avoids: M2 = sum(x^2) - sum(x)^2 / n in float32. On the same data its
    # correlations are off by over 10x the 1e-4 the test above demands (about 1.6e-2 here), so that test
    # guards something real.
    teacher, student, idx = _massive_activation_inputs()
    _, expected_corr = textbook_pearson_loss(teacher, student, idx)
    n = teacher.shape[0]
    t, s = teacher, student  # float32
    m2_t = (t * t).sum(0) - t.sum(0) ** 2 / n
    m2_s = (s * s).sum(0) - s.sum(0) ** 2 / n
    c_ts = (t * s).sum(0) - t.sum(0) * s.sum(0) / n
    naive_corr = c_ts / (m2_t.clamp_min(1e-12).sqrt() * m2_s.clamp_min(1e-12).sqrt())
    naive_error = (naive_corr.double() - torch.tensor(expected_corr, dtype=torch.float64)).abs().max()
    assert naive_error > 1e-3


def test_combine_moments_of_blocks_equals_moments_of_the_whole():
    teacher, student, idx = make_inputs(shape=(40,), d_t=9, d_s=4, dtype=torch.float64, seed=17)
    whole = correlation_moments(teacher, student, idx)
    bounds = [0, 3, 3, 17, 40]  # uneven blocks, one of them empty
    blocks = torch.stack(
        [correlation_moments(teacher[a:b], student[a:b], idx) for a, b in itertools.pairwise(bounds)]
    )
    assert blocks.shape == (4, len(MOMENT_NAMES), 4)
    merged = combine_moments(blocks)
    assert torch.allclose(merged, whole, rtol=1e-12, atol=1e-12)
    # and against the textbook centred sums directly
    t_c = teacher[:, idx] - teacher[:, idx].mean(0)
    s_c = student - student.mean(0)
    textbook = torch.stack(
        [
            torch.full((4,), 40.0, dtype=torch.float64),
            teacher[:, idx].mean(0),
            student.mean(0),
            (t_c**2).sum(0),
            (s_c**2).sum(0),
            (t_c * s_c).sum(0),
        ]
    )
    assert torch.allclose(merged, textbook, rtol=1e-12, atol=1e-12)


def test_combine_moments_gradient_equals_the_whole_batch_gradient():
    teacher, student, idx = make_inputs(shape=(30,), d_t=8, d_s=3, dtype=torch.float64, seed=18)
    s_whole = student.clone().requires_grad_(True)
    correlation_loss(teacher, s_whole, idx).backward()
    s_blocks = student.clone().requires_grad_(True)
    bounds = [0, 7, 19, 30]
    blocks = torch.stack(
        [correlation_moments(teacher[a:b], s_blocks[a:b], idx) for a, b in itertools.pairwise(bounds)]
    )
    loss, _ = correlation_from_moments(combine_moments(blocks))
    loss.backward()
    assert torch.allclose(s_blocks.grad, s_whole.grad, rtol=1e-10, atol=1e-12)


class ThreadGroup:
    """Two 'ranks' as threads; ``all_reduce`` sums a tensor over them (every rank gets the same sum)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.num_calls = [0] * world_size

    def all_reduce_for(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.num_calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()  # every rank has written
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other  # same order on every rank: bit-identical results
            self.barrier.wait()  # every rank has read before the next call overwrites
            return total

        return all_reduce

    def run(self, fn):
        results, errors = [None] * self.world_size, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.all_reduce_for(rank))
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_global_scope_two_thread_ranks_equal_single_process(dtype, rtol):
    g = torch.Generator().manual_seed(19)
    d_in, d_t, d_s, seq = 5, 9, 3, 6
    idx = torch.tensor([7, 0, 4])
    weight = torch.randn(d_in, d_s, generator=g, dtype=torch.float64).to(dtype)  # the "student model"
    inputs = [torch.randn(2, seq, d_in, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    teachers = [torch.randn(2, seq, d_t, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    masks = [random_mask((2, seq), seed=20), torch.zeros(2, seq, dtype=torch.bool)]
    masks[1][0, 3] = True  # rank 1 holds a single valid row: locally too few, globally fine

    def rank_step(rank, all_reduce):
        local_weight = weight.clone().requires_grad_(True)  # each rank's replica, as in data parallelism
        student = inputs[rank] @ local_weight
        loss = correlation_loss(teachers[rank], student, idx, masks[rank], all_reduce=all_reduce)
        loss.backward()
        return loss.detach(), local_weight.grad

    group = ThreadGroup(2)
    (loss0, grad0), (loss1, grad1) = group.run(rank_step)
    assert group.num_calls == [2, 2]

    single_weight = weight.clone().requires_grad_(True)
    student_all = torch.cat(inputs) @ single_weight
    single_loss = correlation_loss(torch.cat(teachers), student_all, idx, torch.cat(masks))
    single_loss.backward()

    expected, _ = textbook_pearson_loss(torch.cat(teachers), student_all, idx, torch.cat(masks))
    assert single_loss.item() == pytest.approx(expected, rel=max(rtol, 1e-6))
    assert loss0.item() == loss1.item()  # every rank reports the same global loss
    assert loss0.item() == pytest.approx(single_loss.item(), rel=rtol)
    # each rank holds only its rows' share; their sum (what DDP's gradient all-reduce forms) is the whole
    assert not torch.allclose(grad0, single_weight.grad, rtol=1e-3)
    assert torch.allclose(grad0 + grad1, single_weight.grad, rtol=rtol, atol=rtol * 1e-2)


def test_global_scope_with_too_few_rows_in_total_raises_on_every_rank():
    teacher, student, idx = make_inputs(shape=(2, 3), d_t=6, d_s=2)
    masks = [torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)]
    masks[0][1, 1] = True  # one row in total

    outcomes = []

    def rank_step(rank, all_reduce):
        try:
            correlation_loss(teacher, student, idx, masks[rank], all_reduce=all_reduce)
        except ValueError as exc:
            outcomes.append(str(exc))

    ThreadGroup(2).run(rank_step)
    assert len(outcomes) == 2 and all("got 1" in message for message in outcomes)
