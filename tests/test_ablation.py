"""Tests of flexkd_ds.jobs.ablate (unit zeroing, ablation, selection stability) and ``score.py --ablate``.

References are written out here: logits of ``head(hidden * mask)``, float64 cross-entropy over the masked
head input, float64 autograd of the tangent scores, and python top-k over float64 means.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from _helpers import REPO, SCORE, run_job

from flexkd_ds.evaluation import ablation
from flexkd_ds.inputs import data
from flexkd_ds.inputs.byte_tokenizer import byte_tokenizer
from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config
from flexkd_ds.method.importance import ImportanceFile

INSTRUCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"
D, V = 16, 8
PLANTED = [2, 5, 9, 13]  # the units that carry the planted model's output


def tiny_llama(seed: int = 0, hidden: int = D, vocab: int = V):
    config = tiny_config("llama", hidden_size=hidden, num_layers=1, num_heads=2, vocab_size=vocab)
    return build_causal_lm_from_config(config, seed=seed).eval()


def batch_of(sequences: list[list[int]], prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
    """``data.collate`` layout: labels[t] = input_ids[t + 1] after the prompt, -100 elsewhere."""
    examples = []
    for ids, prompt in zip(sequences, prompt_lengths, strict=True):
        labels = [-100] * (prompt - 1) + ids[prompt:] + [-100]
        examples.append({"input_ids": ids, "labels": labels})
    return data.collate(examples, pad_id=0)


def counting_batches() -> list[dict[str, torch.Tensor]]:
    """Sequences that count modulo V (next = current + 1), of several lengths (right padding)."""
    seqs = [[(s + t) % V for t in range(n)] for s, n in [(0, 7), (3, 5), (6, 6), (1, 4)]]
    return [batch_of(seqs[:2], [2, 3]), batch_of(seqs[2:], [1, 2])]


def planted_model():
    """A tiny LLaMA whose output depends on units ``PLANTED`` only: the blocks add nothing (o_proj, down_proj
    zero), the embedding of token v holds a distinct even-weight +-1 code on PLANTED and small noise
    elsewhere, and the head maps code(v) to token v + 1 (the counting rule)."""
    model = tiny_llama(seed=3)
    gen = torch.Generator().manual_seed(0)
    codes = torch.tensor(
        [[(v >> 0) & 1, (v >> 1) & 1, (v >> 2) & 1, bin(v).count("1") % 2] for v in range(V)]
    )
    codes = 2.0 * codes.float() - 1.0  # (V, 4): pairwise Hamming distance >= 2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = 0.05 * torch.randn(V, D, generator=gen)
        embed[:, PLANTED] = codes
        model.model.embed_tokens.weight.copy_(embed)
        model.model.norm.weight.fill_(1.0)
        head = 0.05 * torch.randn(V, D, generator=gen)
        for v in range(V):
            head[(v + 1) % V, PLANTED] = codes[v]
        model.lm_head.weight.copy_(head)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    return model


def planted_scores() -> torch.Tensor:
    scores = 0.01 * torch.arange(D, dtype=torch.float32)  # distinct: top / bottom are unambiguous
    scores[PLANTED] += 1.0
    return scores


def reference_nll(model, batches, zero_units) -> float:
    """float64 cross-entropy of the head applied to the head input with ``zero_units`` set to 0."""
    weight = model.lm_head.weight.detach().double()
    total, tokens = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state.double()  # (B, T, d): LLaMA's final norm output = head input
        mask = torch.ones(hidden.shape[-1], dtype=torch.float64)
        mask[list(zero_units)] = 0.0
        logits = (hidden * mask) @ weight.T  # (B, T, V)
        log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = log_probs[batch["loss_mask"]]  # (N, V)
        total -= float(picked.gather(1, batch["labels"][batch["loss_mask"]][:, None]).sum())
        tokens += int(batch["loss_mask"].sum())
    return total / tokens


# ---- zeroed_units -----------------------------------------------------------------------------------


def test_zeroed_units_zeroes_exactly_those_columns_and_removes_the_hook():
    model = tiny_llama(seed=1, hidden=24, vocab=32)
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # (2, 7, 24)
        plain_logits = model(input_ids=ids).logits
        units = [1, 4, 7, 23]
        mask = torch.ones(24)
        mask[units] = 0.0
        with ablation.zeroed_units(model, torch.tensor(units)):
            with ablation.head_inputs(model) as seen:
                ablated_logits = model(input_ids=ids).logits
        expected = head(hidden * mask)
    torch.testing.assert_close(ablated_logits, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ablated_logits, plain_logits, atol=1e-3)
    (head_input,) = seen
    assert bool((head_input[..., units] == 0).all())
    keep = [u for u in range(24) if u not in units]
    assert torch.equal(head_input[..., keep], hidden[..., keep])
    assert len(head._forward_pre_hooks) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain_logits, rtol=0, atol=0)


def test_zeroed_units_hook_is_removed_after_an_exception():
    model = tiny_llama()
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="boom"):
        with ablation.zeroed_units(model, [0, 3]):
            assert len(head._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(head._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="out of range"):
        with ablation.zeroed_units(model, [D]):
            model(input_ids=torch.tensor([[1, 2]]))
    assert len(head._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="distinct"):
        with ablation.zeroed_units(model, [1, 1]):
            pass


# ---- which units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "percent, d_teacher, units",
    [(5, 64, 3), (10, 64, 6), (20, 64, 13), (50, 64, 32), (12.5, 4, 1), (37.5, 4, 2), (2.5, 100, 3),
     (0.1, 10, 1), (99, 10, 9), (50, 576, 288), (5, 576, 29)],
)  # fmt: skip
def test_percent_to_unit_count_rounds_half_up_and_clamps(percent, d_teacher, units):
    # k = floor(p * d / 100 + 1/2), kept in [1, d - 1]
    assert ablation.units_for_percent(percent, d_teacher) == units


@pytest.mark.parametrize("bad", [0, 100, -5, 150, math.nan, True, "10"])
def test_percent_outside_open_interval_is_refused(bad):
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        ablation.units_for_percent(bad, 64)
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        ablation.check_percents([5, bad])


def test_check_percents_refuses_duplicates_and_empty():
    with pytest.raises(ValueError, match="duplicates"):
        ablation.check_percents([5, 10, 5.0])
    with pytest.raises(ValueError, match="no ablation percent"):
        ablation.check_percents([])


def test_top_bottom_random_units():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.7, 0.3])
    assert ablation.ablation_units(scores, 2, "top").tolist() == [2, 4]
    assert ablation.ablation_units(scores, 3, "bottom").tolist() == [1, 3, 5]  # tie 0.1: lower index first
    first = ablation.ablation_units(torch.rand(64), 20, "random", seed=7)
    again = ablation.ablation_units(torch.rand(64), 20, "random", seed=7)
    assert torch.equal(first, again) and torch.unique(first).numel() == 20
    assert not torch.equal(first, ablation.ablation_units(scores.new_zeros(64), 20, "random", seed=8))
    smaller = ablation.ablation_units(torch.rand(64), 5, "random", seed=7)
    assert set(smaller.tolist()) <= set(first.tolist())  # nested across p for one seed
    with pytest.raises(ValueError, match="seed"):
        ablation.ablation_units(scores, 2, "random")
    with pytest.raises(ValueError, match="kind"):
        ablation.ablation_units(scores, 2, "middle")


# ---- the ablation -----------------------------------------------------------------------------------


def test_planted_units_top_removal_hurts_more_and_numbers_match_float64_reference():
    model, batches, scores = planted_model(), counting_batches(), planted_scores()
    result = ablation.run_ablation(model, scores, batches, percents=[25, 50], random_draws=3, seed=11)
    baseline = reference_nll(model, batches, [])
    assert baseline < 0.05  # the planted model predicts the counting rule
    assert result.baseline_nll == pytest.approx(baseline, rel=1e-5, abs=1e-6)
    assert result.tokens == sum(int(b["loss_mask"].sum()) for b in batches)
    order = sorted(range(D), key=lambda u: (-float(scores[u]), u))
    for row, percent, k in zip(result.rows, [25, 50], [4, 8], strict=True):
        assert (row.percent, row.units) == (percent, k)
        top, bottom = order[:k], order[::-1][:k]
        assert row.top.nll == pytest.approx(reference_nll(model, batches, top), rel=1e-5, abs=1e-6)
        assert row.bottom.nll == pytest.approx(reference_nll(model, batches, bottom), rel=1e-5, abs=1e-6)
        assert row.top.delta == pytest.approx(row.top.nll - result.baseline_nll)
        assert row.top.ratio == pytest.approx(row.top.nll / result.baseline_nll)
        expected_random = []
        for seed in (11, 12, 13):
            units = torch.randperm(D, generator=torch.Generator().manual_seed(seed))[:k].tolist()
            expected_random.append(reference_nll(model, batches, units))
        assert row.random.seeds == [11, 12, 13]
        assert row.random.nlls == pytest.approx(expected_random, rel=1e-5, abs=1e-6)
        mean = sum(expected_random) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in expected_random) / 3)
        assert (row.random.nll_mean, row.random.nll_std) == pytest.approx((mean, std), rel=1e-4, abs=1e-7)
    top25, bottom25 = result.rows[0].top, result.rows[0].bottom
    assert top25.delta > 1.0 > 0.05 > abs(bottom25.delta)  # removing the planted units destroys the output
    assert top25.delta > result.rows[0].random.delta_mean >= bottom25.delta - 1e-6


def test_random_draws_are_reproducible_with_a_seed():
    model, batches = tiny_llama(seed=2), counting_batches()
    scores = torch.rand(D, generator=torch.Generator().manual_seed(0))
    kwargs = dict(percents=[20], random_draws=2, progress=False)
    first = ablation.run_ablation(model, scores, batches, seed=5, **kwargs)
    second = ablation.run_ablation(model, scores, batches, seed=5, **kwargs)
    other = ablation.run_ablation(model, scores, batches, seed=6, **kwargs)
    assert first.rows[0].random.nlls == second.rows[0].random.nlls
    assert first.rows[0].random.nlls[1] == other.rows[0].random.nlls[0]  # draw j uses seed + j
    assert first.rows[0].random.nlls[0] != other.rows[0].random.nlls[1]


def test_ablation_refuses_other_teacher_bad_percent_and_no_rows():
    model, batches = tiny_llama(), counting_batches()
    found = ImportanceFile(
        scores=torch.rand(D), indices=torch.arange(4), metadata={"teacher": "random:other"}, path="imp.st"
    )
    with pytest.raises(ValueError, match="mismatching: teacher"):
        ablation.run_ablation(model, found, batches, teacher="random:this", progress=False)
    with pytest.raises(ValueError, match="another teacher"):
        ablation.run_ablation(model, torch.rand(D + 1), batches, progress=False)
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        ablation.run_ablation(model, torch.rand(D), batches, percents=[0], progress=False)
    with pytest.raises(ValueError, match="no rows"):
        ablation.run_ablation(model, torch.rand(D), [], progress=False)


def test_report_files(tmp_path):
    model, batches = tiny_llama(seed=2), counting_batches()
    result = ablation.run_ablation(model, torch.rand(D), batches, percents=[10, 50], random_draws=2)
    stable = ablation.selection_stability(torch.rand(6, D), 4, subsets=2)
    json_path, md_path = ablation.write_report(tmp_path, result, stable)
    saved = json.loads(json_path.read_text())
    assert [row["percent"] for row in saved["ablation"]["rows"]] == [10, 50]
    assert saved["ablation"]["rows"][1]["top"]["nll"] == result.rows[1].top.nll
    assert saved["stability"]["mean"] == stable.mean
    table = md_path.read_text()
    assert "| p (%) | units | top | bottom | random (mean ± std) | baseline |" in table
    assert "| 10 | 2 |" in table and "| 50 | 8 |" in table


# ---- classification accuracy ------------------------------------------------------------------------

COUNTING_ROWS = [([0, 1, 2], [3, 5, 7]), ([4, 5], [1, 6, 2]), ([6], [0, 7, 4]), ([2, 3, 4, 5], [6, 1, 3])]
# (prompt tokens, option tokens); the counting rule's answer (last + 1 mod V) is option 1, 1, 0, 0


def counting_choices() -> ablation.ChoiceSet:
    """Each (prompt, single-token option) as one example; the option's token is the only label."""
    sequences, prompts, owners, options, gold = [], [], [], [], []
    for r, (prompt, opts) in enumerate(COUNTING_ROWS):
        for j, option in enumerate(opts):
            sequences.append(prompt + [option])
            prompts.append(len(prompt))
            owners.append(r)
            options.append(j)
        gold.append(opts.index((prompt[-1] + 1) % V))
    batches = [batch_of(sequences[i : i + 5], prompts[i : i + 5]) for i in range(0, len(sequences), 5)]
    return ablation.ChoiceSet(batches, owners, options, gold)


def reference_accuracy(model, zero_units) -> float:
    """float64: log p(option | prompt) from the masked head input; the best option per row is right?"""
    weight = model.lm_head.weight.detach().double()
    mask = torch.ones(D, dtype=torch.float64)
    mask[list(zero_units)] = 0.0
    right = 0
    for prompt, opts in COUNTING_ROWS:
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1].double()
        logits = (hidden * mask) @ weight.T  # (V,)
        log_probs = logits - torch.logsumexp(logits, dim=0)
        best = max(range(len(opts)), key=lambda j: (float(log_probs[opts[j]]), -j))
        right += opts[best] == (prompt[-1] + 1) % V
    return right / len(COUNTING_ROWS)


def test_accuracy_on_a_planted_classification_set_matches_float64_reference():
    model, batches, scores, choices = (
        planted_model(),
        counting_batches(),
        planted_scores(),
        counting_choices(),
    )
    result = ablation.run_ablation(
        model, scores, batches, percents=[25], random_draws=3, seed=11, choices=choices, progress=False
    )
    assert result.baseline_accuracy == reference_accuracy(model, []) == 1.0
    assert result.choice_rows == len(COUNTING_ROWS)
    row = result.rows[0]
    order = sorted(range(D), key=lambda u: (-float(scores[u]), u))
    assert row.top.accuracy == reference_accuracy(model, order[:4])
    assert row.bottom.accuracy == reference_accuracy(model, order[-4:]) == 1.0
    assert row.top.accuracy < 1.0  # the planted units carry the answer
    draws = [
        reference_accuracy(model, torch.randperm(D, generator=torch.Generator().manual_seed(s))[:4].tolist())
        for s in (11, 12, 13)
    ]
    assert row.random.accuracies == draws
    assert row.random.accuracy_mean == pytest.approx(sum(draws) / 3)
    table = result.to_markdown()
    assert f"Accuracy (%) over {len(COUNTING_ROWS)} classification rows" in table
    assert f"| 25 | 4 | {100 * row.top.accuracy:.1f} | 100.0 |" in table


def test_ablation_without_choices_reports_no_accuracy():
    result = ablation.run_ablation(tiny_llama(), torch.rand(D), counting_batches(), percents=[50],
                                   random_draws=1, progress=False)  # fmt: skip
    assert result.baseline_accuracy is None and result.rows[0].top.accuracy is None
    assert "Accuracy" not in result.to_markdown()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_choice_set_encodes_each_option_as_the_response(tmp_path):
    tokenizer = byte_tokenizer()
    path = write_rows(tmp_path / "sst.jsonl", [
        {"prompt": "Review: great film. Sentiment:", "output": "positive", "options": ["negative", "positive"]},
        {"prompt": "Review: dull. Sentiment:", "output": "negative", "options": ["negative", "positive", "mixed"]},
    ])  # fmt: skip
    rows = data.load_instruction_rows(path).rows
    choices = ablation.choice_set(rows, tokenizer, max_length=64, batch_size=2)
    assert (choices.owners, choices.options, choices.gold) == ([0, 0, 1, 1, 1], [0, 1, 0, 1, 2], [1, 0])
    examples = [(b, i) for b in choices.batches for i in range(b["input_ids"].shape[0])]
    assert [len(b["input_ids"]) for b in choices.batches] == [2, 2, 1]
    texts = ["negative", "positive", "negative", "positive", "mixed"]
    for (batch, i), text in zip(examples, texts, strict=True):
        labels = batch["labels"][i][batch["loss_mask"][i]].tolist()
        assert labels == tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        assert tokenizer.decode(labels[:-1]) == text  # the option + EOS, nothing else
    shared = ablation.choice_set(
        rows[:1], tokenizer, max_length=64, batch_size=4, shared_options=["positive", "no"]
    )
    assert shared.options == [0, 1] and shared.gold == [1]  # a row's own column wins over the shared list


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "output": "yes", "options": ["no", "maybe"]}, "not among 'options'"),
        ({"prompt": "p", "output": "yes", "options": ["yes"]}, "two or more distinct"),
        ({"prompt": "p", "output": "yes", "options": ["yes", "yes"]}, "two or more distinct"),
        ({"prompt": "p", "output": "yes", "options": ["yes", " "]}, "non-empty strings"),
        ({"prompt": "p", "output": "yes"}, "no 'options' list"),
    ],
)
def test_choice_set_refuses_bad_rows_naming_them(tmp_path, row, message):
    good = {"prompt": "q", "output": "no", "options": ["yes", "no"]}
    rows = data.load_instruction_rows(write_rows(tmp_path / "cls.jsonl", [good, row])).rows
    with pytest.raises(data.DataError, match=message) as info:
        ablation.choice_set(rows, byte_tokenizer(), max_length=32, batch_size=2)
    assert "cls.jsonl, row 2" in str(info.value)


def test_choice_set_refuses_an_option_that_does_not_fit(tmp_path):
    rows = data.load_instruction_rows(
        write_rows(tmp_path / "long.jsonl", [{"prompt": "p", "output": "a" * 40, "options": ["a" * 40, "b"]}])
    ).rows
    with pytest.raises(data.DataError, match="max_length=16"):
        ablation.choice_set(rows, byte_tokenizer(), max_length=16, batch_size=2)


def test_cli_reports_accuracy_for_a_classification_file(tmp_path):
    """score.py --ablate with --options on a yes/no file: accuracy in ablation.json and ablation.md."""
    path = write_rows(tmp_path / "yesno.jsonl", [
        {"prompt": f"Is {n} even? Answer:", "output": "yes" if n % 2 == 0 else "no"} for n in range(6)
    ])  # fmt: skip
    out = tmp_path / "run"
    flags = ["--ablate", "--eval-data", str(path), "--random-draws", "2", "--percents", "10", "50",
             "--options", "yes", "no"]  # fmt: skip
    run_job(SCORE, out, flags, nprocs=1, timeout=240)
    saved = json.loads((out / "ablation.json").read_text())["ablation"]
    assert saved["choice_rows"] == 6
    accuracies = [saved["baseline_accuracy"]] + [
        row[kind]["accuracy"] for row in saved["rows"] for kind in ("top", "bottom")
    ] + [a for row in saved["rows"] for a in row["random"]["accuracies"]]  # fmt: skip
    assert len(accuracies) == 1 + 2 * 2 + 2 * 2
    assert all(a in {k / 6 for k in range(7)} for a in accuracies), accuracies  # a share of 6 rows
    table = (out / "ablation.md").read_text()
    assert "Accuracy (%) over 6 classification rows" in table
    assert f"| {100 * saved['baseline_accuracy']:.1f} |" in table


def test_cli_refuses_options_without_eval_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _score_module().main(
            ["--config", str(REPO / "launch/recipes/tiny.yaml"), "--ablate", "--options", "a", "b"]
        )
    assert exit_info.value.code == 2
    assert "--options gives the answers of the --eval-data rows" in capsys.readouterr().err


# ---- stability -----------------------------------------------------------------------------------


def test_identical_subsets_overlap_fully():
    row = torch.rand(D, generator=torch.Generator().manual_seed(4))
    result = ablation.selection_stability(row.repeat(9, 1), 6, subsets=3, seed=0)
    assert result.overlaps == [1.0, 1.0, 1.0] and result.mean == result.min == 1.0
    assert result.pairs == [(0, 1), (0, 2), (1, 2)] and result.subset_sizes == [3, 3, 3]


def test_planted_disjoint_behaviour_gives_expected_overlap():
    # one example per subset, whatever the split: example 0 favours units 0..7, example 1 units 4..11
    rows = torch.zeros(2, D)
    rows[0, :8] = 1.0
    rows[1, 4:12] = 1.0
    result = ablation.selection_stability(rows, 8, subsets=2, seed=3)
    assert result.overlaps == [0.5] and result.min == 0.5


def test_stability_matches_an_independent_split_reference():
    per_example = torch.rand(31, 40, generator=torch.Generator().manual_seed(9))
    per_example[:, :6] += 0.3  # a stable core, the rest is noise
    result = ablation.selection_stability(per_example, 10, subsets=3, seed=2)
    parts = result.subset_examples
    assert sorted(i for part in parts for i in part) == list(range(31))  # disjoint and complete
    assert [len(p) for p in parts] == result.subset_sizes and max(result.subset_sizes) - min(
        result.subset_sizes
    ) <= 1

    def top(indices):
        means = [sum(float(per_example[i, u].double()) for i in indices) / len(indices) for u in range(40)]
        return set(sorted(range(40), key=lambda u: (-means[u], u))[:10])

    selections = [top(part) for part in parts]
    expected = [len(selections[a] & selections[b]) / 10 for a, b in [(0, 1), (0, 2), (1, 2)]]
    assert result.overlaps == pytest.approx(expected)
    assert result.mean == pytest.approx(sum(expected) / 3) and result.min == pytest.approx(min(expected))
    everything = top(range(31))
    assert result.overlap_with_all == pytest.approx([len(s & everything) / 10 for s in selections])
    with pytest.raises(ValueError, match="subsets must be an int >= 2"):
        ablation.selection_stability(per_example, 10, subsets=1)
    with pytest.raises(ValueError, match="cannot fill"):
        ablation.selection_stability(per_example[:2], 10, subsets=3)


def test_example_tangent_scores_match_float64_autograd():
    model, batches = tiny_llama(seed=5), counting_batches()
    got = ablation.example_tangent_scores(model, batches, progress=False)
    weight = model.lm_head.weight.detach().double()
    rows = []
    for batch in batches:
        with torch.no_grad():
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for b in range(batch["input_ids"].shape[0]):
            valid = batch["attention_mask"][b].bool()
            h = hidden.last_hidden_state[b, valid].double().requires_grad_(True)  # (n, d)
            total = torch.log_softmax(h @ weight.T, dim=-1).sum()  # F = sum_t sum_v log p
            (grad,) = torch.autograd.grad(total, h)
            rows.append(grad.abs().mean(dim=0))
    torch.testing.assert_close(got.double(), torch.stack(rows), rtol=1e-4, atol=1e-6)


# ---- the command line -------------------------------------------------------------------------------


def _score_module():
    spec = importlib.util.spec_from_file_location("score_cli", REPO / SCORE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags", [["--percents", "0"], ["--percents", "100"], ["--percents", "5", "x=1"]])
def test_cli_refuses_bad_percents(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _score_module().main(["--config", str(REPO / "launch/recipes/tiny.yaml"), "--ablate", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "outside (0, 100)" in err or "put key=value overrides before --percents" in err


def test_cli_refuses_an_eval_file_without_rows(tmp_path):
    from flexkd_ds.inputs.config import load_config
    from flexkd_ds.jobs.ablate import run_ablate

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = load_config(REPO / "launch/recipes/tiny.yaml", [f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="empty|no rows"):
        run_ablate(cfg, eval_data=str(empty))
    assert not (tmp_path / "out").exists()  # refused before scoring wrote anything


def test_cli_ablate_and_stability_on_the_tiny_recipe(tmp_path):
    dolly = INSTRUCT / "dolly_valid.jsonl"
    if not dolly.is_file():
        pytest.skip(f"{dolly} not found (the repo's parent must hold shared/data)")
    out = tmp_path / "run"
    flags = ["--ablate", "--eval-data", str(dolly), "--max-rows", "6", "--stability", "--subsets", "2",
             "--random-draws", "2", "--percents", "5", "10", "50"]  # fmt: skip
    result = run_job(SCORE, out, flags, nprocs=1, timeout=240)
    assert (out / "importance.safetensors").is_file()  # scored first: no file was there
    saved = json.loads((out / "ablation.json").read_text())
    rows = saved["ablation"]["rows"]
    assert [row["percent"] for row in rows] == [5, 10, 50]
    assert [row["units"] for row in rows] == [3, 6, 32]  # d_T = 64
    baseline = saved["ablation"]["baseline_nll"]
    assert math.isfinite(baseline) and baseline > 0
    for row in rows:
        assert len(row["random"]["nlls"]) == 2
        for kind in ("top", "bottom"):
            assert row[kind]["delta"] == pytest.approx(row[kind]["nll"] - baseline)
    stable = saved["stability"]
    assert stable["d_student"] == 32 and stable["subset_sizes"] == [16, 16] and 0 < stable["min"] <= 1
    table = (out / "ablation.md").read_text()
    for row in rows:
        assert f"| {row['percent']:g} | {row['units']} | {row['top']['nll']:.4f} " in table
    assert "pairwise overlap mean" in table and "| p (%) |" in result.output
