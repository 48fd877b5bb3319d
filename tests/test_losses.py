"""Logit divergences, LM loss, CKA and the projector baseline (flexkd_ds.method.losses) against float64 textbook
formulas written out in this file."""

from __future__ import annotations

import math

import pytest
import torch

from flexkd_ds.method.losses import (
    LOGIT_DIVERGENCES,
    Projector,
    cka_loss,
    lm_loss,
    logit_divergence,
    projector_mse_loss,
    projector_mse_loss_from_projected,
)

# --------------------------------------------------------------------------------------------------------
# float64 textbook references
# --------------------------------------------------------------------------------------------------------


def softmax64(logits, temperature):
    """p_v = exp(z_v / T) / sum_w exp(z_w / T), float64; -inf logits give p_v = 0."""
    z = logits.detach().double() / temperature
    z = z - z.max(dim=-1, keepdim=True).values
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)


def kl64(a, b):
    """sum_v a_v log(a_v / b_v) with 0 log(0 / b) = 0 (and +inf where a_v > 0 = b_v)."""
    total = torch.zeros(a.shape[:-1], dtype=torch.float64)
    for v in range(a.shape[-1]):
        a_v, b_v = a[..., v], b[..., v]
        term = torch.where(a_v > 0, a_v * torch.log(a_v / b_v), torch.zeros_like(a_v))
        total = total + term
    return total


def reference_divergence(kind, p, q, skew=0.1, jsd_beta=0.5):
    """Per-token divergence from the papers' definitions, in probability space."""
    if kind == "fkl":
        return kl64(p, q)
    if kind == "rkl":
        return kl64(q, p)
    if kind == "jsd" and jsd_beta in (0.0, 1.0):  # GKD/TRL convention at the endpoints
        return kl64(p, q) if jsd_beta == 0.0 else kl64(q, p)
    if kind == "jsd":
        m = jsd_beta * p + (1 - jsd_beta) * q
        return jsd_beta * kl64(p, m) + (1 - jsd_beta) * kl64(q, m)
    if kind == "skew_fkl":
        return kl64(p, skew * p + (1 - skew) * q)
    if kind == "skew_rkl":
        return kl64(q, (1 - skew) * p + skew * q)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def entropy64(p):
    return -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)


def make_logits(shape=(3, 5), vocab=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = 2.5 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    teacher = 3.0 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64) + 0.5 * student
    return student.to(dtype), teacher.to(dtype)


def make_mask(shape=(3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask.reshape(-1)[0] = True
    mask.reshape(-1)[-1] = False
    return mask


KIND_ARGS = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"jsd_beta": 0.5}),
    ("jsd", {"jsd_beta": 0.2}),
    ("skew_fkl", {"skew": 0.1}),
    ("skew_rkl", {"skew": 0.3}),
    ("tvd", {}),
]

# --------------------------------------------------------------------------------------------------------
# logit_divergence
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs", KIND_ARGS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_divergence_matches_textbook(kind, kwargs, reduction):
    student, teacher = make_logits()
    mask = make_mask()
    temperature = 2.0
    per_token = reference_divergence(
        kind, softmax64(teacher, temperature), softmax64(student, temperature), **kwargs
    )
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    got = logit_divergence(
        student, teacher, mask, kind=kind, temperature=temperature, reduction=reduction, **kwargs
    )
    assert got.dtype == torch.float32
    if reduction == "none":
        assert got.shape == mask.shape
        assert torch.allclose(got.double(), per_token, rtol=1e-5, atol=1e-6)
        assert (got[~mask] == 0).all()
        return
    expected = per_token.sum() if reduction == "sum" else per_token.sum() / mask.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_temperature_changes_the_value():
    # guards against T being ignored (and documents: no T^2 factor)
    student, teacher = make_logits()
    at_1 = logit_divergence(student, teacher, None, kind="fkl", temperature=1.0)
    at_3 = logit_divergence(student, teacher, None, kind="fkl", temperature=3.0)
    expected_3 = kl64(softmax64(teacher, 3.0), softmax64(student, 3.0)).mean()
    assert at_3.item() == pytest.approx(expected_3.item(), rel=1e-5)
    assert abs(at_1.item() - at_3.item()) > 1e-2


def test_float64_stays_float64_and_bf16_accumulates_in_float32():
    student, teacher = make_logits(dtype=torch.float64, seed=2)
    got = logit_divergence(student, teacher, None, kind="jsd", jsd_beta=0.3, temperature=1.5)
    assert got.dtype == torch.float64
    p, q = softmax64(teacher, 1.5), softmax64(student, 1.5)
    assert got.item() == pytest.approx(
        reference_divergence("jsd", p, q, jsd_beta=0.3).mean().item(), rel=1e-12
    )
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    got16 = logit_divergence(s16, t16, None, kind="fkl")
    assert got16.dtype == torch.float32
    expected16 = kl64(softmax64(t16, 1.0), softmax64(s16, 1.0)).mean()  # same bf16 inputs, upcast
    assert got16.item() == pytest.approx(expected16.item(), rel=1e-5)


def test_jsd_endpoints_are_fkl_and_rkl():
    student, teacher = make_logits(seed=3)
    mask = make_mask(seed=4)
    kw = {"temperature": 2.0, "reduction": "none"}
    fkl = logit_divergence(student, teacher, mask, kind="fkl", **kw)
    rkl = logit_divergence(student, teacher, mask, kind="rkl", **kw)
    assert torch.allclose(logit_divergence(student, teacher, mask, kind="jsd", jsd_beta=0.0, **kw), fkl)
    assert torch.allclose(logit_divergence(student, teacher, mask, kind="jsd", jsd_beta=1.0, **kw), rkl)
    p, q = softmax64(teacher, 2.0), softmax64(student, 2.0)
    assert torch.allclose(fkl.double()[mask], kl64(p, q)[mask], rtol=1e-5)
    assert torch.allclose(rkl.double()[mask], kl64(q, p)[mask], rtol=1e-5)
    assert not torch.allclose(fkl, rkl, rtol=1e-2)  # the two endpoints really differ


def test_jsd_half_is_the_symmetric_textbook_jsd():
    # JSD(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2, a form independent of the KL-to-mixture code path
    student, teacher = make_logits(seed=5)
    p, q = softmax64(teacher, 2.0), softmax64(student, 2.0)
    expected = entropy64((p + q) / 2) - 0.5 * (entropy64(p) + entropy64(q))
    got = logit_divergence(
        student, teacher, None, kind="jsd", jsd_beta=0.5, temperature=2.0, reduction="none"
    )
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-7)
    # symmetric: swapping the roles of student and teacher gives the same value at beta = 0.5
    swapped = logit_divergence(
        teacher, student, None, kind="jsd", jsd_beta=0.5, temperature=2.0, reduction="none"
    )
    assert torch.allclose(got, swapped, rtol=1e-5, atol=1e-7)
    assert expected.max() <= math.log(2)  # and bounded by log 2, as the JSD must be


def test_skew_zero_is_fkl_rkl_and_skew_one_is_zero():
    student, teacher = make_logits(seed=6)
    kw = {"temperature": 2.0, "reduction": "none"}
    fkl = logit_divergence(student, teacher, None, kind="fkl", **kw)
    rkl = logit_divergence(student, teacher, None, kind="rkl", **kw)
    assert torch.allclose(logit_divergence(student, teacher, None, kind="skew_fkl", skew=0.0, **kw), fkl)
    assert torch.allclose(logit_divergence(student, teacher, None, kind="skew_rkl", skew=0.0, **kw), rkl)
    for kind in ("skew_fkl", "skew_rkl"):
        student_leaf = student.clone().requires_grad_(True)
        at_one = logit_divergence(student_leaf, teacher, None, kind=kind, skew=1.0, reduction="sum")
        assert at_one.abs().item() < 1e-6
        at_one.backward()  # still attached to the graph
        assert student_leaf.grad.abs().max() < 1e-6


@pytest.mark.parametrize(
    "kind, kwargs", KIND_ARGS + [("skew_fkl", {"skew": 0.0}), ("jsd", {"jsd_beta": 1.0})]
)
def test_gradcheck_float64(kind, kwargs):
    student, teacher = make_logits(shape=(2, 3), vocab=5, seed=7, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    student.requires_grad_(True)

    def fn(s):
        return logit_divergence(s, teacher, mask, kind=kind, temperature=1.7, reduction="sum", **kwargs)

    assert torch.autograd.gradcheck(fn, (student,))

    def fn_none(s):
        return logit_divergence(s, teacher, mask, kind=kind, temperature=1.7, reduction="none", **kwargs)

    assert torch.autograd.gradcheck(fn_none, (student,))


@pytest.mark.parametrize("kind", LOGIT_DIVERGENCES)
def test_all_masked_sum_is_attached_zero_and_mean_raises(kind):
    student, teacher = make_logits(seed=8)
    student.requires_grad_(True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    total = logit_divergence(student, teacher, mask, kind=kind, reduction="sum")
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert student.grad is not None and (student.grad == 0).all()
    with pytest.raises(ValueError, match="no valid token"):
        logit_divergence(student, teacher, mask, kind=kind, reduction="mean")
    none = logit_divergence(student, teacher, mask, kind=kind, reduction="none")
    assert none.shape == (3, 5) and (none == 0).all()


@pytest.mark.parametrize("kind", LOGIT_DIVERGENCES)
def test_teacher_gets_no_gradient(kind):
    student, teacher = make_logits(seed=9)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    logit_divergence(student, teacher, make_mask(), kind=kind, temperature=2.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("fkl", {}),
        ("jsd", {"jsd_beta": 0.5}),
        ("jsd", {"jsd_beta": 0.0}),
        ("skew_fkl", {"skew": 0.1}),
        ("skew_rkl", {"skew": 0.1}),
        ("tvd", {}),
    ],
)
def test_minus_inf_teacher_logits_give_finite_values_and_gradients(kind, kwargs):
    student, teacher = make_logits(seed=10)
    teacher[..., :3] = -math.inf  # the teacher rules out three tokens everywhere
    teacher[0, 0, 5:] = -math.inf  # and almost everything at one position
    student.requires_grad_(True)
    got = logit_divergence(student, teacher, None, kind=kind, temperature=2.0, reduction="none", **kwargs)
    assert torch.isfinite(got).all()
    p, q = softmax64(teacher, 2.0), softmax64(student, 2.0)
    assert (p[..., :3] == 0).all()
    expected = reference_divergence(kind, p, q, **kwargs)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    "kind, kwargs",
    [("jsd", {"jsd_beta": 0.4}), ("skew_fkl", {"skew": 0.2}), ("skew_rkl", {"skew": 0.2}), ("tvd", {})],
)
def test_tokens_ruled_out_by_both_models_give_no_nan(kind, kwargs):
    # p_v = q_v = 0: the log-space mixture is log 0 = -inf there, and backward must not turn that into NaN
    student, teacher = make_logits(seed=31)
    student[..., :2] = -math.inf
    teacher[..., :2] = -math.inf
    student.requires_grad_(True)
    got = logit_divergence(student, teacher, None, kind=kind, temperature=2.0, reduction="none", **kwargs)
    expected = reference_divergence(kind, softmax64(teacher, 2.0), softmax64(student, 2.0), **kwargs)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_reverse_kl_with_minus_inf_logits():
    student, teacher = make_logits(seed=11)
    teacher[..., :3] = -math.inf
    # where both rule the same tokens out, 0 log 0 = 0 keeps rkl finite and exact
    both = student.clone()
    both[..., :3] = -math.inf
    both.requires_grad_(True)
    got = logit_divergence(both, teacher, None, kind="rkl", reduction="none")
    expected = kl64(softmax64(both, 1.0), softmax64(teacher, 1.0))
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(both.grad).all()
    # student mass where the teacher has none: KL(q || p) is +inf exactly (documented), never NaN
    value = logit_divergence(student, teacher, None, kind="rkl", reduction="none")
    assert torch.isposinf(value).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "kl"}, "kind must be one of .*fkl.*tvd"),
        ({"kind": "fkl", "temperature": 0.0}, "temperature"),
        ({"kind": "fkl", "temperature": -1.0}, "temperature"),
        ({"kind": "fkl", "temperature": float("nan")}, "temperature"),
        ({"kind": "skew_fkl", "skew": -0.1}, "skew"),
        ({"kind": "skew_rkl", "skew": 1.5}, "skew"),
        ({"kind": "jsd", "jsd_beta": 1.01}, "jsd_beta"),
        ({"kind": "jsd", "jsd_beta": -0.5}, "jsd_beta"),
        ({"kind": "fkl", "reduction": "batchmean"}, "reduction"),
    ],
)
def test_argument_value_errors(kwargs, match):
    student, teacher = make_logits()
    with pytest.raises(ValueError, match=match):
        logit_divergence(student, teacher, make_mask(), **kwargs)


def test_shape_and_mask_value_errors():
    student, teacher = make_logits(vocab=7)
    _, wide_teacher = make_logits(vocab=9)
    mask = make_mask()
    vocab_message = (
        "vocabulary sizes differ: student V=7, teacher V=9; logit distillation needs the same vocabulary"
    )
    with pytest.raises(ValueError, match=vocab_message):
        logit_divergence(student, wide_teacher, mask, kind="fkl")
    with pytest.raises(ValueError, match="student_logits .* teacher_logits"):
        logit_divergence(student, teacher[:, :4], mask, kind="fkl")
    with pytest.raises(ValueError, match="valid_mask"):
        logit_divergence(student, teacher, mask[:, :4], kind="fkl")
    with pytest.raises(ValueError, match="valid_mask must be a bool"):
        logit_divergence(student, teacher, mask.long(), kind="fkl")


# --------------------------------------------------------------------------------------------------------
# lm_loss
# --------------------------------------------------------------------------------------------------------


def reference_cross_entropy(logits, labels, ignore_index=-100):
    """Per-token -log softmax(z)[y] written out in float64; returns (list of values, count)."""
    z = logits.detach().double().reshape(-1, logits.shape[-1])
    values = []
    for row, label in zip(z, labels.reshape(-1).tolist(), strict=True):
        if label == ignore_index:
            continue
        log_norm = math.log(sum(math.exp(float(x - row.max())) for x in row)) + float(row.max())
        values.append(log_norm - float(row[label]))
    return values


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lm_loss_matches_written_out_cross_entropy(reduction):
    logits, _ = make_logits(shape=(2, 6), vocab=13, seed=12)
    g = torch.Generator().manual_seed(13)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[0, :2] = -100
    labels[1, 5] = -100
    values = reference_cross_entropy(logits, labels)
    expected = sum(values) if reduction == "sum" else sum(values) / len(values)
    got = lm_loss(logits, labels, reduction=reduction)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_lm_loss_custom_ignore_index_and_bf16():
    logits, _ = make_logits(shape=(4,), vocab=9, seed=14)
    labels = torch.tensor([3, 0, 8, 0])
    values = reference_cross_entropy(logits, labels, ignore_index=0)
    assert len(values) == 2
    got = lm_loss(logits, labels, ignore_index=0)
    assert got.item() == pytest.approx(sum(values) / 2, rel=1e-5)
    got16 = lm_loss(logits.bfloat16(), labels, ignore_index=0, reduction="sum")
    assert got16.dtype == torch.float32
    values16 = reference_cross_entropy(logits.bfloat16(), labels, ignore_index=0)
    assert got16.item() == pytest.approx(sum(values16), rel=1e-5)


def test_lm_loss_gradient_and_all_ignored():
    logits, _ = make_logits(shape=(2, 3), vocab=5, seed=15, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: lm_loss(z, labels, reduction="sum"), (logits,))
    nothing = torch.full((2, 3), -100)
    total = lm_loss(logits, nothing, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and (logits.grad == 0).all()
    with pytest.raises(ValueError, match="no valid token"):
        lm_loss(logits, nothing, reduction="mean")


def test_lm_loss_value_errors():
    logits, _ = make_logits(shape=(2, 3), vocab=5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels .* must have the shape"):
        lm_loss(logits, labels[:, :2])
    with pytest.raises(ValueError, match="labels must lie in"):
        lm_loss(logits, labels + 5)
    with pytest.raises(ValueError, match="labels must be an integer"):
        lm_loss(logits, labels.float())
    with pytest.raises(ValueError, match="reduction"):
        lm_loss(logits, labels, reduction="none")


# --------------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------------


def reference_cka(x, y):
    """HSIC-based linear CKA in float64: H = I - 11^T / n, K = X X^T, L = Y Y^T."""
    x, y = x.detach().double(), y.detach().double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return (hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))).item()


def make_hidden(shape, d_t, d_s, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*shape, d_t, generator=g, dtype=torch.float64) + 3.0
    mix = torch.randn(d_t, d_s, generator=g, dtype=torch.float64)
    student = 0.3 * teacher @ mix + torch.randn(*shape, d_s, generator=g, dtype=torch.float64)
    return teacher, student


@pytest.mark.parametrize(
    "shape, d_t, d_s",
    [((3, 6), 24, 16), ((300,), 6, 4)],  # few rows: the N x N Gram form; many rows: the d x d form
)
def test_cka_matches_hsic_reference(shape, d_t, d_s):
    teacher, student = make_hidden(shape, d_t, d_s, seed=16)
    mask = make_mask(shape, seed=17)
    expected = 1.0 - reference_cka(student[mask], teacher[mask])
    assert 0.01 < expected < 0.99  # neither trivial end
    got = cka_loss(teacher.float(), student.float(), mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    got64 = cka_loss(teacher, student, mask)
    assert got64.dtype == torch.float64 and got64.item() == pytest.approx(expected, rel=1e-12)
    # without the mask the value changes: the mask is honoured
    assert abs(cka_loss(teacher, student).item() - expected) > 1e-4


def test_cka_invariant_to_isotropic_scaling_and_orthogonal_transforms_of_the_student():
    teacher, student = make_hidden((40,), 10, 6, seed=18)
    g = torch.Generator().manual_seed(19)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = cka_loss(teacher, student)
    assert cka_loss(teacher, 7.3 * student).item() == pytest.approx(base.item(), rel=1e-12)
    assert cka_loss(teacher, student @ q).item() == pytest.approx(base.item(), rel=1e-10)
    # a non-isotropic scaling is not an invariance: the test can tell
    squash = torch.diag(torch.tensor([5.0, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert abs(cka_loss(teacher, student @ squash).item() - base.item()) > 1e-4


def test_cka_large_activations_do_not_overflow_float32():
    teacher, student = make_hidden((64,), 32, 16, seed=20)
    expected = 1.0 - reference_cka(student, teacher)
    # far beyond real activations: unscaled, the Gram entries' squares would overflow float32 here
    got = cka_loss(1e9 * teacher.float(), 1e9 * student.float())
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("shape, d_t, d_s", [((2, 3), 8, 5), ((30,), 3, 2)])
def test_cka_gradcheck_and_teacher_gets_no_gradient(shape, d_t, d_s):
    teacher, student = make_hidden(shape, d_t, d_s, seed=21)
    mask = make_mask(shape, seed=22)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: cka_loss(teacher, s, mask), (student,))
    teacher.requires_grad_(True)
    cka_loss(teacher, student, mask).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_cka_constant_student_gives_loss_one_and_finite_gradient():
    teacher, _ = make_hidden((12,), 5, 3, seed=23)
    student = torch.full((12, 3), 2.5, dtype=torch.float32, requires_grad=True)
    loss = cka_loss(teacher.float(), student)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(student.grad).all()


def test_cka_value_errors():
    teacher, student = make_hidden((2, 3), 6, 4, seed=24)
    one_row = torch.zeros(2, 3, dtype=torch.bool)
    one_row[1, 2] = True
    with pytest.raises(ValueError, match="at least 2 valid rows"):
        cka_loss(teacher, student, one_row)
    with pytest.raises(ValueError, match="at least 2 valid rows"):
        cka_loss(teacher[:1, :1], student[:1, :1])
    with pytest.raises(ValueError, match="must agree in every dimension"):
        cka_loss(teacher, student[:, :2])
    with pytest.raises(ValueError, match="valid_mask"):
        cka_loss(teacher, student, one_row[:, :2])
    with pytest.raises(ValueError, match="valid_mask must be a bool"):
        cka_loss(teacher, student, one_row.float())


# --------------------------------------------------------------------------------------------------------
# Projector
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_projector_mse_matches_written_out_formula(reduction):
    torch.manual_seed(25)
    projector = Projector(4, 6)
    teacher, student = make_hidden((3, 5), 6, 4, seed=26)
    mask = make_mask((3, 5), seed=27)
    weight = projector.linear.weight.detach().double()  # (d_T, d_S)
    bias = projector.linear.bias.detach().double()
    values = []
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                continue
            s, y = student[b, t], teacher[b, t]
            values.append(sum(float(weight[j] @ s + bias[j] - y[j]) ** 2 for j in range(6)) / 6)
    expected = sum(values) if reduction == "sum" else sum(values) / len(values)
    got = projector_mse_loss(projector, student.float(), teacher.float(), mask, reduction=reduction)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the engine's route: the projection ran in the student's forward, over every position
    projected = projector(student.float())  # (3, 5, 6)
    got_projected = projector_mse_loss_from_projected(projected, teacher.float(), mask, reduction=reduction)
    assert got_projected.item() == pytest.approx(expected, rel=1e-5)


def test_projector_gradient_reaches_parameters_and_student_not_teacher():
    projector = Projector(3, 5).double()
    teacher, student = make_hidden((7,), 5, 3, seed=28)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    projector_mse_loss(projector, student, teacher, reduction="sum").backward()
    # analytic gradient of sum_n mean_j r_nj^2, r = s W^T + b - t:  dW = (2 / d_T) r^T s,  db = (2 / d_T) sum_n r
    w, b = projector.linear.weight.detach(), projector.linear.bias.detach()
    residual = student.detach() @ w.T + b - teacher.detach()
    assert torch.allclose(projector.linear.weight.grad, 2.0 / 5 * residual.T @ student.detach(), rtol=1e-12)
    assert torch.allclose(projector.linear.bias.grad, 2.0 / 5 * residual.sum(0), rtol=1e-12)
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_projector_init_bias_option_and_dtypes():
    projector = Projector(16, 8)
    bound = 1 / math.sqrt(16)
    assert projector.linear.weight.shape == (8, 16)
    assert projector.linear.weight.abs().max() <= bound and projector.linear.bias.abs().max() <= bound
    assert Projector(16, 8, bias=False).linear.bias is None
    teacher, student = make_hidden((5,), 8, 16, seed=29)
    got = projector_mse_loss(projector, student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32 and torch.isfinite(got)


def test_projector_empty_mask_and_value_errors():
    projector = Projector(3, 5)
    teacher, student = make_hidden((2, 4), 5, 3, seed=30)
    teacher, student = teacher.float(), student.float().requires_grad_(True)
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    total = projector_mse_loss(projector, student, teacher, nothing, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and (projector.linear.weight.grad == 0).all()
    with pytest.raises(ValueError, match="no valid token"):
        projector_mse_loss(projector, student, teacher, nothing)
    with pytest.raises(ValueError, match="d_student"):
        Projector(0, 5)
    with pytest.raises(ValueError, match="d_teacher"):
        Projector(3, 0)
    with pytest.raises(ValueError, match="d_student=3 -> d_teacher=5"):
        projector_mse_loss(projector, student, teacher[..., :4])
    with pytest.raises(ValueError, match="reduction"):
        projector_mse_loss(projector, student, teacher, reduction="none")
    with pytest.raises(ValueError, match="valid_mask"):
        projector_mse_loss(projector, student, teacher, nothing[:, :3])
    with pytest.raises(ValueError, match="projected_hidden .* must have the shape of teacher_hidden"):
        projector_mse_loss_from_projected(projector(student)[..., :4], teacher)
    with pytest.raises(ValueError, match="no valid token"):
        projector_mse_loss_from_projected(projector(student), teacher, nothing)
    teacher.requires_grad_(True)
    projected = projector(student).detach().requires_grad_(True)
    projector_mse_loss_from_projected(projected, teacher).backward()
    assert teacher.grad is None and projected.grad.abs().sum() > 0
