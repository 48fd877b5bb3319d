"""bench/unit_alignment.py (issue 14's diagnostic): its measures against numpy written out here on data whose
answer is known (a student that is a linear map of the teacher; independent noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import REPO, load_script


@pytest.fixture(scope="module")
def ua():
    return load_script(REPO / "bench" / "unit_alignment.py")


def test_measures_against_numpy(ua):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(400, 12)) + rng.normal(size=12)  # uncentred on purpose
    units = np.array([5, 0, 9, 3, 7, 1])
    student = 0.5 * teacher[:, units] + rng.normal(scale=0.5, size=(400, 6)) + 3.0
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)

    corr = ua.unit_correlations(s, t[:, torch.from_numpy(units)])
    expected = [np.corrcoef(student[:, m], teacher[:, units[m]])[0, 1] for m in range(6)]
    np.testing.assert_allclose(corr.numpy(), expected, rtol=1e-12)

    sc, tc = student - student.mean(0), teacher - teacher.mean(0)
    cka = np.linalg.norm(sc.T @ tc) ** 2 / (np.linalg.norm(sc.T @ sc) * np.linalg.norm(tc.T @ tc))
    assert ua.linear_cka(s, t) == pytest.approx(cka, rel=1e-10)

    coef, *_ = np.linalg.lstsq(sc, tc, rcond=None)
    r2 = 1 - ((tc - sc @ coef) ** 2).sum() / (tc**2).sum()
    assert ua.linear_r2(s, t) == pytest.approx(r2, rel=1e-8)
    assert 0 < r2 < 1

    shuffled = torch.tensor([1, 5, 0, 9, 3, 7])
    m = ua.measure(s, t, torch.from_numpy(units), shuffled)
    assert m["flexkd"] == pytest.approx(sum((1 - c) ** 2 for c in expected), rel=1e-10)
    assert m["corr"] > 0.5 > abs(m["corr_shuffled"])  # paired units correlate; unpaired ones do not


def test_a_linear_map_of_the_teacher_is_fully_explained(ua):
    rng = np.random.default_rng(1)
    teacher = torch.from_numpy(rng.normal(size=(300, 8)))
    student = teacher @ torch.from_numpy(rng.normal(size=(8, 8)))  # invertible map: nothing lost
    assert ua.linear_r2(student, teacher) == pytest.approx(1.0, abs=1e-9)
    assert ua.unit_correlations(teacher, teacher).numpy() == pytest.approx(np.ones(8))


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def test_head_oracles_against_numpy(ua):
    """A head whose dropped columns are combinations of the kept ones loses nothing with the least-squares
    input (its NLL is the teacher's); the kept units alone lose the dropped columns' share."""
    rng = np.random.default_rng(2)
    vocab, d_t, units = 40, 6, np.array([4, 0, 2, 5])
    head = rng.normal(size=(vocab, d_t))
    head[:, [1, 3]] = head[:, units] @ rng.normal(size=(4, 2))  # dropped = combinations of kept
    hidden = rng.normal(size=(200, d_t)) * 2
    labels = rng.integers(0, vocab, size=200)
    labels[::7] = -100  # rows without a response token: skipped
    got = ua.head_oracles(
        torch.from_numpy(hidden), torch.from_numpy(labels), torch.from_numpy(head), torch.from_numpy(units)
    )
    rows = labels != -100
    teacher_nll = _nll(hidden[rows] @ head.T, labels[rows])
    kept_nll = _nll(hidden[rows][:, units] @ head[:, units].T, labels[rows])
    assert got["tokens"] == rows.sum()
    assert got["nll_teacher"] == pytest.approx(teacher_nll, rel=1e-5)
    assert got["nll_kept"] == pytest.approx(kept_nll, rel=1e-5)
    assert got["nll_lsq"] == pytest.approx(teacher_nll, rel=1e-5)
    assert abs(got["nll_kept"] - teacher_nll) > 0.1  # the dropped columns mattered


def test_residual_structure_against_numpy(ua):
    """Matched and residual parts, their NLLs and the head's energy split, recomputed here with numpy."""
    rng = np.random.default_rng(3)
    n, d, vocab = 300, 5, 30
    kept = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d)
    slope_true = np.array([2.0, -1.0, 0.5, 1.5, -0.3])
    student = kept * slope_true + 0.7 * rng.normal(size=(n, d)) + 4.0
    head, cut_head = rng.normal(size=(vocab, d)), rng.normal(size=(vocab, d))
    labels = rng.integers(0, vocab, size=n)
    labels[::5] = -100
    perm = rng.permutation(n)
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    got = ua.residual_structure(t(student), t(kept), t(head), t(cut_head), t(labels), t(perm))

    rows = labels != -100
    fits = [np.polyfit(kept[:, m], student[:, m], 1) for m in range(d)]  # (slope, intercept) per unit
    slope = np.array([f[0] for f in fits])
    mean = student.mean(0)
    matched = (kept - kept.mean(0)) * slope + mean
    residual = student - matched
    scaled = (kept - kept.mean(0)) * (student.std(0) / kept.std(0)) * np.sign(slope) + mean

    def nll(x, w):
        return _nll(x[rows] @ w.T, labels[rows])

    assert got["nll_student"] == pytest.approx(nll(student, head), rel=1e-5)
    assert got["nll_matched"] == pytest.approx(nll(matched, head), rel=1e-5)
    assert got["nll_matched_noise"] == pytest.approx(nll(matched + residual[perm], head), rel=1e-5)
    assert got["nll_teacher_scaled"] == pytest.approx(nll(scaled, head), rel=1e-5)
    corr = np.array([np.corrcoef(student[:, m], kept[:, m])[0, 1] for m in range(d)])
    shrunk = (student - mean) * np.abs(corr) + mean
    assert got["nll_student_shrunk"] == pytest.approx(nll(shrunk, head), rel=1e-5)
    assert got["nll_cut_head"] == pytest.approx(nll(student, cut_head), rel=1e-5)
    centred_student = student - mean
    assert got["residual_share"] == pytest.approx((residual**2).sum() / (centred_student**2).sum(), rel=1e-10)
    total = ((centred_student @ head.T) ** 2).sum()
    zm, zr = (matched - mean) @ head.T, residual @ head.T
    assert got["logit_matched"] == pytest.approx((zm**2).sum() / total, rel=1e-9)
    assert got["logit_residual"] == pytest.approx((zr**2).sum() / total, rel=1e-9)
    assert got["logit_cross"] == pytest.approx(2 * (zm * zr).sum() / total, rel=1e-9)
    assert got["logit_matched"] + got["logit_residual"] + got["logit_cross"] == pytest.approx(1.0)


def test_residual_structure_of_an_exact_affine_copy(ua):
    """A student that is a per-unit affine map of the teacher (signs included) has no residual, and the
    teacher at the student's scale is the student itself."""
    rng = np.random.default_rng(4)
    kept = rng.normal(size=(200, 4))
    student = kept * np.array([3.0, -2.0, 0.5, -0.1]) + np.array([1.0, 0.0, -2.0, 5.0])
    head = rng.normal(size=(12, 4))
    labels = rng.integers(0, 12, size=200)
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    got = ua.residual_structure(t(student), t(kept), t(head), t(head), t(labels), t(rng.permutation(200)))
    assert got["residual_share"] == pytest.approx(0.0, abs=1e-20)
    for key in (
        "nll_matched",
        "nll_matched_noise",
        "nll_student_shrunk",
        "nll_teacher_scaled",
        "nll_cut_head",
    ):
        assert got[key] == pytest.approx(got["nll_student"], rel=1e-6), key


def test_noise_curve(ua):
    """rho = 1 is the clean NLL (numpy); less correlation, worse NLL on labels the clean units predict."""
    rng = np.random.default_rng(5)
    kept = rng.normal(size=(2000, 8)) * 3
    head = rng.normal(size=(20, 8))
    labels = (kept @ head.T).argmax(1)
    curve = ua.noise_curve(
        torch.from_numpy(kept), torch.from_numpy(head), torch.from_numpy(labels), (0.3, 0.9, 1.0)
    )
    assert list(curve) == ["0.300", "0.900", "1.000"]
    assert curve["1.000"] == pytest.approx(_nll(kept @ head.T, labels), rel=1e-5)
    assert curve["0.300"] > curve["0.900"] + 0.3 > curve["1.000"] + 0.3
    with pytest.raises(ValueError, match="rho"):
        ua.noise_curve(torch.from_numpy(kept), torch.from_numpy(head), torch.from_numpy(labels), (0.0,))


def test_a_run_with_other_per_unit_names_keeps_the_earlier_ones(ua):
    old = {"groups": "quarters", "logit_weight_share": [0.4, 0.3, 0.2, 0.1], "sft-seed1": [0.6, 0.5, 0.5, 0.4],
           "rkl-s240-b0.5-seed1": [0.7, 0.6, 0.6, 0.5]}  # fmt: skip
    assert ua.earlier_runs(old, ["rkl-s240-b0.5-seed1", "sft-s240-seed1"]) == {
        "sft-seed1": [0.6, 0.5, 0.5, 0.4]
    }


def test_measuring_a_new_run_leaves_the_recorded_per_unit_runs_alone(ua):
    """``--runs NEW`` with the default ``--per-unit`` list once measured every per-unit run again, so it
    needed students lost with an earlier machine, stopped on the first, and its saves had dropped the
    per-unit record by then (2026-12-04)."""
    per_unit = ["sft-seed1", "flexkd-seed1", "rkl-seed1"]
    old_per_unit = {"groups": "q", "sft-seed1": [0.6], "flexkd-seed1": [0.7]}
    old_runs = {"sft-seed1": {}, "flexkd-seed1": {}}  # rkl-seed1 has no record yet
    assert ua.per_unit_to_measure(per_unit, old_per_unit, old_runs, ["sft-s240-seed1"]) == ["rkl-seed1"]
    assert ua.per_unit_to_measure(per_unit, old_per_unit, old_runs, None) == ["rkl-seed1"]
    assert ua.per_unit_to_measure(per_unit, old_per_unit, old_runs, ["flexkd-seed1"]) == [
        "flexkd-seed1",
        "rkl-seed1",
    ]
    assert ua.per_unit_to_measure(per_unit, old_per_unit, {"sft-seed1": {}}, []) == [
        "flexkd-seed1",
        "rkl-seed1",
    ]


def test_the_pairing_is_the_cuts_plan_and_a_run_that_disagrees_stops_it(ua, tmp_path):
    import json

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "prune.json").write_text(json.dumps({"plan": {"units": [5, 0, 3]}}))
    (tmp_path / "runs").mkdir()
    assert ua.cut_units(tmp_path, cut) == [5, 0, 3]  # no run left a unit_pairing.json (lost students)
    (tmp_path / "runs" / "flexkd").mkdir()
    (tmp_path / "runs" / "flexkd" / "unit_pairing.json").write_text(json.dumps({"units": [5, 0, 3]}))
    assert ua.cut_units(tmp_path, cut) == [5, 0, 3]
    (tmp_path / "runs" / "flexkd" / "unit_pairing.json").write_text(json.dumps({"units": [0, 5, 3]}))
    with pytest.raises(SystemExit, match="otherwise"):
        ua.cut_units(tmp_path, cut)


def test_distribution_measures_against_numpy(ua):
    """Entropy, KL both ways and top-1 agreement on the labelled rows only, against float64 numpy written out
    here; a student that is the teacher has zero KL and full agreement."""
    gen = torch.Generator().manual_seed(3)
    n, d_s, d_t, vocab = 37, 5, 7, 11
    student, teacher = (
        torch.randn(n, d_s, generator=gen).double(),
        torch.randn(n, d_t, generator=gen).double(),
    )
    s_head, t_head = (
        torch.randn(vocab, d_s, generator=gen).double(),
        torch.randn(vocab, d_t, generator=gen).double(),
    )
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    got = ua.distribution_measures(student, s_head, teacher, t_head, labels, chunk=8)

    keep = (labels != -100).numpy()

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    log_q = log_softmax(student.numpy()[keep] @ s_head.numpy().T)
    log_p = log_softmax(teacher.numpy()[keep] @ t_head.numpy().T)
    q, p = np.exp(log_q), np.exp(log_p)
    expected = {
        "entropy": float(-(q * log_q).sum(axis=1).mean()),
        "teacher_entropy": float(-(p * log_p).sum(axis=1).mean()),
        "fkl": float((p * (log_p - log_q)).sum(axis=1).mean()),
        "rkl": float((q * (log_q - log_p)).sum(axis=1).mean()),
        "top1_agree": float((log_q.argmax(1) == log_p.argmax(1)).mean()),
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert 0 < expected["top1_agree"] < 1  # the case tells agreement from disagreement

    same = ua.distribution_measures(teacher, t_head, teacher, t_head, labels)
    assert same["fkl"] == pytest.approx(0, abs=1e-5) and same["rkl"] == pytest.approx(0, abs=1e-5)
    assert same["top1_agree"] == 1 and same["entropy"] == pytest.approx(same["teacher_entropy"], rel=1e-6)
