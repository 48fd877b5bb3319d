"""bench/generation_shape.py (issue 14's diagnostic): its measures on saved predictions whose lengths, LCS and
repeats are counted by hand here, and its refusal of predictions that do not give the recorded ROUGE-L."""

from __future__ import annotations

import json

import pytest
from _helpers import REPO, WordTokenizer, load_script


@pytest.fixture(scope="module")
def gs():
    return load_script(REPO / "bench" / "generation_shape.py")


def write_eval(tmp_path, name, rows, recorded_mean, max_new_tokens=10):
    eval_dir = tmp_path / "rouge"
    (eval_dir / "predictions" / name).mkdir(parents=True)
    (eval_dir / "predictions" / name / "Dolly.greedy.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows)
    )
    record = {"seeds": [None], "per_seed": [recorded_mean], "mean": recorded_mean, "std": 0.0, "n": len(rows)}
    results = {
        "protocol": {"max_new_tokens": max_new_tokens},
        "models": {name: {"rougeL": {"Dolly": {"greedy": record}}}},
    }
    (eval_dir / "results.json").write_text(json.dumps(results))
    return eval_dir


def test_repeated_4gram_share(gs):
    assert gs.repeated_4gram_share("a b c") == 0.0
    assert gs.repeated_4gram_share("a b c d e") == 0.0
    # "a b c d a b c d": 5 four-grams, "a b c d" twice -> 4 distinct, 1 repeat -> 1/5
    assert gs.repeated_4gram_share("a b c d a b c d") == pytest.approx(1 / 5)


def test_measures_of_hand_counted_predictions(gs, tmp_path):
    rows = [
        # 3 words against "cat on mat" exactly: P = R = F = 100
        {"prediction": "cat on mat", "references": ["cat on mat"]},
        # 6 words, within 4 of the cap of 10 (at the cap; 3 words are not), LCS "cat mat" = 2 against 2 words: P = 2/6, R = 1, F = 1/2
        {"prediction": "a cat sat on the mat", "references": ["cat mat"]},
    ]
    f_mean = (100.0 + 50.0) / 2
    shapes = gs.measure_run(write_eval(tmp_path, "m", rows, f_mean), "m", WordTokenizer())
    got = shapes["greedy"]["Dolly"]
    assert got["tokens"] == pytest.approx(4.5)
    assert got["at_cap"] == pytest.approx(0.5)
    assert got["precision"] == pytest.approx((100.0 + 100 * 2 / 6) / 2)
    assert got["recall"] == pytest.approx(100.0)
    assert got["rougeL"] == pytest.approx(f_mean)
    assert got["repeat4"] == 0.0


def test_predictions_that_do_not_give_the_recorded_rouge_stop_it(gs, tmp_path):
    rows = [{"prediction": "cat on mat", "references": ["cat on mat"]}]
    with pytest.raises(SystemExit, match="recorded 90.000000"):
        gs.measure_run(write_eval(tmp_path, "m", rows, 90.0), "m", WordTokenizer())
