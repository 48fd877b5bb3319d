"""bench/unit_alignment.py (issue 14's diagnostic): its measures against numpy written out here on data whose
answer is known (a student that is a linear map of the teacher; independent noise)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from _helpers import REPO


@pytest.fixture(scope="module")
def ua():
    spec = importlib.util.spec_from_file_location(
        "unit_alignment_bench", REPO / "bench" / "unit_alignment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
