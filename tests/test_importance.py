"""Tests of flexkd_ds.method.importance against references written out here (float64 autograd, hand numbers)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flexkd_ds
from flexkd_ds.method.importance import (
    REQUIRED_METADATA,
    ImportanceAccumulator,
    ImportanceFile,
    aggregate_scores,
    importance_file_hash,
    load_importance,
    save_importance,
    select_units,
    selection_overlap,
    tail_mass,
    tangent_scores,
    tangent_scores_autograd,
)

B, T, D_T, V = 4, 9, 6, 13


def reference_scores(hidden, weight, mask, bias=None, functional="sum_logprobs", labels=None):
    """float64 autograd through log_softmax of the head, one example at a time: (B, d_T)."""
    rows = []
    for b in range(hidden.shape[0]):
        positions = mask[b].nonzero().flatten()
        h = hidden[b, positions].to(torch.float64).requires_grad_(True)  # (n, d_T)
        logits = h @ weight.to(torch.float64).T  # (n, V)
        if bias is not None:
            logits = logits + bias.to(torch.float64)
        log_probs = torch.log_softmax(logits, dim=-1)
        if functional == "sum_logprobs":
            total = log_probs.sum()
        else:
            total = log_probs[torch.arange(len(positions)), labels[b, positions]].sum()
        (grad,) = torch.autograd.grad(total, h)
        rows.append(grad.abs().mean(dim=0))
    return torch.stack(rows)


def make_inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D_T, generator=gen, dtype=torch.float64)
    # A wide weight spread makes the softmax far from uniform, so the V * p_t term matters.
    weight = 1.5 * torch.randn(V, D_T, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([9, 5, 1, 7])  # different lengths; example 3 is left-padded below
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    mask[3] = mask[3].flip(0)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[~mask] = -100
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), mask, labels


@pytest.mark.parametrize("functional", ["sum_logprobs", "label_logprob"])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 4096])
def test_closed_form_matches_float64_autograd_reference(functional, chunk_tokens):
    hidden, weight, bias, mask, labels = make_inputs()
    expected = reference_scores(hidden, weight, mask, bias, functional, labels)
    got = tangent_scores(
        hidden, weight, mask, functional=functional, labels=labels, head_bias=bias, chunk_tokens=chunk_tokens
    )
    assert got.dtype == torch.float64 and got.shape == (B, D_T)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    library_autograd = tangent_scores_autograd(
        hidden, weight, mask, functional=functional, labels=labels, head_bias=bias
    )
    torch.testing.assert_close(library_autograd, expected, rtol=1e-10, atol=1e-12)


def test_inputs_exercise_bias_and_non_uniform_softmax():
    hidden, weight, bias, mask, _ = make_inputs()
    with_bias = reference_scores(hidden, weight, mask, bias)
    # If p_t were uniform, dF/dh_t = W^T (1 - V/V) = 0; the scores must be far from that, and the bias
    # must change them (it enters through p_t only).
    assert with_bias.min() > 1e-2
    assert (with_bias - reference_scores(hidden, weight, mask, None)).abs().max() > 1e-2
    got = tangent_scores(hidden, weight, mask, head_bias=None, chunk_tokens=2)
    torch.testing.assert_close(got, reference_scores(hidden, weight, mask, None), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_give_float32_close_to_reference(dtype):
    hidden, weight, bias, mask, labels = make_inputs(dtype)
    # The reference sees the same rounded inputs, in float64.
    expected = reference_scores(hidden.double(), weight.float().double(), mask, bias.double())
    got = tangent_scores(hidden, weight.float(), mask, head_bias=bias, chunk_tokens=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=1e-5)


def test_empty_examples_error_or_zero_rows():
    hidden, weight, bias, mask, labels = make_inputs()
    mask[1] = False
    mask[3] = False
    with pytest.raises(ValueError, match=r"batch index \[1, 3\]"):
        tangent_scores(hidden, weight, mask)
    got = tangent_scores(hidden, weight, mask, head_bias=bias, empty="zero", chunk_tokens=3)
    assert torch.equal(got[1], torch.zeros(D_T, dtype=torch.float64))
    assert torch.equal(got[3], torch.zeros(D_T, dtype=torch.float64))
    keep = torch.tensor([0, 2])
    expected = reference_scores(hidden[keep], weight, mask[keep], bias)
    torch.testing.assert_close(got[keep], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be"),
        (lambda a: a.update(valid_mask=a["valid_mask"].long()), "valid_mask must be"),
        (lambda a: a.update(valid_mask=a["valid_mask"][:, :-1]), "valid_mask must be"),
        (lambda a: a.update(head_weight=a["head_weight"][:, :-1]), "head_weight must be"),
        (lambda a: a.update(head_bias=a["head_weight"][:, 0][:-1]), "head_bias must be"),
        (lambda a: a.update(chunk_tokens=0), "chunk_tokens"),
        (lambda a: a.update(functional="entropy"), "functional must be one of"),
        (lambda a: a.update(empty="skip"), "empty must be one of"),
        (lambda a: a.update(functional="label_logprob", labels=None), "needs labels"),
        (lambda a: a.update(functional="label_logprob", labels=a["labels"][:, :-1]), "labels must be"),
    ],
)
def test_invalid_arguments_raise(change, message):
    hidden, weight, _, mask, labels = make_inputs()
    kwargs = dict(hidden=hidden, head_weight=weight, valid_mask=mask, labels=labels)
    change(kwargs)
    with pytest.raises(ValueError, match=message):
        tangent_scores(**kwargs)


def test_label_outside_vocab_at_valid_position_is_named():
    hidden, weight, _, mask, labels = make_inputs()
    labels[1, 2] = V  # position (1, 2) is valid
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 13"):
        tangent_scores(hidden, weight, mask, functional="label_logprob", labels=labels)
    labels[1, 2] = 0
    labels[1, 7] = V + 5  # invalid position: ignored
    assert tangent_scores(hidden, weight, mask, functional="label_logprob", labels=labels).shape == (B, D_T)


def test_accumulator_two_ranks_equal_single_batch_mean_and_skips_empty_rows():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(7, D_T, generator=gen, dtype=torch.float64)
    num_tokens = torch.tensor([3, 0, 5, 2, 0, 1, 4])
    counted = num_tokens > 0
    expected_mean = scores[counted].sum(0) / int(counted.sum())

    ranks = [ImportanceAccumulator(D_T), ImportanceAccumulator(D_T)]
    ranks[0].update(scores[:3].float(), num_tokens[:3])
    ranks[1].update(scores[3:5].float(), num_tokens[3:5])
    ranks[1].update(scores[5:].float(), num_tokens[5:])
    reduced = ranks[0].state_tensor() + ranks[1].state_tensor()  # what an all-reduce SUM gives
    assert reduced.dtype == torch.float64 and reduced.shape == (D_T + 3,)

    merged = ImportanceAccumulator(D_T)
    merged.load_state_tensor(reduced)
    assert (merged.num_examples, merged.num_tokens, merged.num_skipped) == (5, 15, 2)
    result = merged.scores()
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected_mean.float().double(), rtol=1e-6, atol=1e-7)
    again = ImportanceAccumulator.from_state_tensor(reduced)
    assert torch.equal(again.scores(), result)
    assert torch.equal(aggregate_scores(scores[counted]), expected_mean.float())


def test_accumulator_with_padded_tangent_scores_equals_mean_over_real_examples():
    hidden, weight, bias, mask, _ = make_inputs()
    padded_mask = mask.clone()
    padded_mask[2] = False  # a padding example, as the scoring job adds to the last batch
    per_example = tangent_scores(hidden, weight, padded_mask, head_bias=bias, empty="zero")
    accumulator = ImportanceAccumulator(D_T)
    accumulator.update(per_example, padded_mask.sum(1))
    real = torch.tensor([0, 1, 3])
    expected = reference_scores(hidden[real], weight, mask[real], bias).mean(0)
    torch.testing.assert_close(accumulator.scores().double(), expected, rtol=1e-6, atol=1e-7)
    assert accumulator.num_skipped == 1 and accumulator.num_tokens == int(mask[real].sum())


def test_accumulator_errors():
    accumulator = ImportanceAccumulator(D_T)
    accumulator.update(torch.ones(2, D_T), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="no example with valid tokens"):
        accumulator.scores()
    with pytest.raises(ValueError, match="non-finite"):
        accumulator.update(torch.full((1, D_T), float("nan")), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\(B, d_T = 6\)"):
        accumulator.update(torch.ones(2, D_T + 1), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="state must have shape"):
        accumulator.load_state_tensor(torch.zeros(D_T + 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="no rows"):
        aggregate_scores(torch.zeros(0, D_T))


def test_select_units_rank_order_and_ties_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    assert select_units(scores, 4).tolist() == [1, 2, 4, 5]
    assert select_units(scores, 2).tolist() == [1, 2]
    assert select_units(torch.tensor([0.5, 0.1, 0.9]), 3).tolist() == [2, 0, 1]
    flat = torch.zeros(300)  # many ties: a non-stable sort would scramble these
    flat[250] = 1.0
    assert select_units(flat, 5).tolist() == [250, 0, 1, 2, 3]
    assert select_units(flat, 5).dtype == torch.int64


@pytest.mark.parametrize(
    ("scores", "k", "message"),
    [
        (torch.ones(4), 0, "k must be"),
        (torch.ones(4), 5, "k must be"),
        (torch.ones(2, 2), 1, "1-D"),
        (torch.tensor([1.0, float("nan")]), 1, "NaN or inf"),
        (torch.tensor([1.0, float("inf")]), 1, "NaN or inf"),
    ],
)
def test_select_units_errors(scores, k, message):
    with pytest.raises(ValueError, match=message):
        select_units(scores, k)


def test_tail_mass_and_overlap_against_hand_numbers():
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert tail_mass(scores, 2) == pytest.approx(3.0 / 10.0)  # top-2 = {1, 3}, tail = 1 + 2
    assert tail_mass(scores, 4) == pytest.approx(0.0)
    assert tail_mass(scores, 1) == pytest.approx(6.0 / 10.0)
    with pytest.raises(ValueError, match="positive sum"):
        tail_mass(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="non-negative"):
        tail_mass(torch.tensor([2.0, -1.0]), 1)

    assert selection_overlap(torch.tensor([1, 2, 3, 4]), [4, 3, 9, 8]) == pytest.approx(0.5)
    assert selection_overlap([5, 6, 7], [7, 5, 6]) == pytest.approx(1.0)
    assert selection_overlap([0], [1]) == 0.0
    with pytest.raises(ValueError, match="same size"):
        selection_overlap([1, 2], [1])
    with pytest.raises(ValueError, match="k = 0"):
        selection_overlap([], [])


def full_metadata(**overrides):
    meta = dict(
        teacher="tiny-llama",
        layer=-1,
        functional="sum_logprobs",
        num_examples=12,
        num_tokens=345,
        tail_mass=0.25,
        dataset="shared/data/train.jsonl",
        seed=7,
    )
    meta.update(overrides)
    return meta


def test_file_round_trip_metadata_strings_and_hash(tmp_path):
    scores = torch.tensor([0.5, 0.25, 1.5, 0.125, 2.0, 0.0])
    indices = torch.tensor([4, 2, 0])
    path = tmp_path / "importance.safetensors"
    save_importance(path, scores, indices, full_metadata())
    assert os.listdir(tmp_path) == ["importance.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & 0o044 == 0o044  # readable by group and others, unlike a raw mkstemp file

    with safe_open(str(path), framework="pt") as handle:  # the raw contract, read without our loader
        raw_meta = handle.metadata()
        assert handle.get_tensor("scores").dtype == torch.float32
        assert handle.get_tensor("indices").dtype == torch.int64
    assert set(REQUIRED_METADATA) <= set(raw_meta)
    assert raw_meta["d_T"] == "6" and raw_meta["d_S"] == "3" and raw_meta["layer"] == "-1"
    assert raw_meta["tail_mass"] == "0.25" and raw_meta["num_tokens"] == "345"
    assert raw_meta["created_by"] == f"flexkd_ds {flexkd_ds.__version__}"

    loaded = load_importance(path)
    assert torch.equal(loaded.scores, scores) and torch.equal(loaded.indices, indices)
    assert loaded.metadata == raw_meta and loaded.path == str(path)

    digest = importance_file_hash(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    save_importance(path, scores, torch.tensor([4, 2, 1]), full_metadata())
    assert importance_file_hash(path) != digest


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "importance.safetensors"
    save_importance(path, torch.ones(4), torch.tensor([0, 1]), full_metadata())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_importance(path, torch.ones(4), torch.tensor([2, 3]), full_metadata())
    assert os.listdir(tmp_path) == ["importance.safetensors"]
    assert path.read_bytes() == before


def test_save_rejects_missing_keys_and_inconsistent_metadata(tmp_path):
    path = tmp_path / "importance.safetensors"
    meta = full_metadata()
    del meta["seed"], meta["dataset"]
    with pytest.raises(ValueError, match=r"missing required keys \['dataset', 'seed'\]"):
        save_importance(path, torch.ones(4), torch.tensor([0]), meta)
    with pytest.raises(ValueError, match="metadata d_S = '5'"):
        save_importance(path, torch.ones(4), torch.tensor([0]), full_metadata(d_S=5))
    with pytest.raises(ValueError, match="distinct units"):
        save_importance(path, torch.ones(4), torch.tensor([1, 1]), full_metadata())
    with pytest.raises(ValueError, match=r"in \[0, d_T = 4\)"):
        save_importance(path, torch.ones(4), torch.tensor([4]), full_metadata())
    assert not path.exists() and os.listdir(tmp_path) == []


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_importance(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not safetensors")
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable safetensors"):
        load_importance(garbage)
    meta = {key: "x" for key in REQUIRED_METADATA} | {"d_T": "3", "d_S": "1"}
    no_indices = tmp_path / "no_indices.safetensors"
    save_file({"scores": torch.ones(3)}, str(no_indices), metadata=meta)
    with pytest.raises(ValueError, match=r"no_indices.safetensors lacks the tensors \['indices'\]"):
        load_importance(no_indices)
    no_teacher = tmp_path / "no_teacher.safetensors"
    meta.pop("teacher")
    save_file({"scores": torch.ones(3), "indices": torch.tensor([0])}, str(no_teacher), metadata=meta)
    with pytest.raises(ValueError, match=r"no_teacher.safetensors lacks the metadata keys \['teacher'\]"):
        load_importance(no_teacher)


def test_check_matches_names_each_mismatching_field(tmp_path):
    path = tmp_path / "importance.safetensors"
    save_importance(path, torch.ones(6), torch.tensor([0, 1, 2]), full_metadata())
    loaded = load_importance(path)
    loaded.check_matches(teacher="tiny-llama", d_teacher=6, d_student=3, functional="sum_logprobs")
    loaded.check_matches(teacher="tiny-llama", d_teacher=6, d_student=3)

    with pytest.raises(ValueError) as info:
        loaded.check_matches(teacher="other", d_teacher=8, d_student=3)
    text = str(info.value)
    assert str(path) in text and "teacher='tiny-llama'" in text and "teacher='other'" in text
    assert "d_T=6" in text and "d_T=8" in text and "d_S" not in text and "importance.recompute=true" in text
    with pytest.raises(ValueError, match=r"mismatching: d_S\)"):
        loaded.check_matches(teacher="tiny-llama", d_teacher=6, d_student=2)
    with pytest.raises(ValueError, match=r"mismatching: functional\)"):
        loaded.check_matches(teacher="tiny-llama", d_teacher=6, d_student=3, functional="label_logprob")
    in_memory = ImportanceFile(loaded.scores, loaded.indices, loaded.metadata)
    with pytest.raises(ValueError, match=r"\(in memory\)"):
        in_memory.check_matches(teacher="x", d_teacher=6, d_student=3)
