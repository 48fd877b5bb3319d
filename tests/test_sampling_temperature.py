"""bench/sampling_temperature.py (issue 14's follow-up on the dev split): the passes it asks of
launch/evaluate.py are the comparison's protocol at another temperature, a stopped sweep resumes without
running a pass twice, and the paired differences are the per-seed differences counted here by hand."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from _helpers import REPO, WordTokenizer, load_script


@pytest.fixture(scope="module")
def st():
    return load_script(REPO / "bench" / "sampling_temperature.py")


@pytest.fixture(scope="module")
def evaluate():
    return load_script(REPO / "launch" / "evaluate.py")


def test_the_passes_are_the_comparisons_protocol_at_another_temperature(st, evaluate, tmp_path):
    sampled = evaluate.options_from_args(st.evaluate_command(tmp_path, "r", 0.7, 100)[2:])
    greedy = evaluate.options_from_args(st.evaluate_command(tmp_path, "r", None, 100)[2:])
    # the settings every test-set ROUGE-L pass of the comparison recorded (docs/data/compare/runs/*.json)
    for opts in (sampled, greedy):
        assert (opts.max_new_tokens, opts.batch_size, opts.dtype, opts.max_rows) == (128, 64, "bf16", 100)
        assert opts.metrics == ("rouge",) and opts.top_p == 1.0 and opts.top_k == 0
        assert [str(p) for _, p in opts.sets] == [str(tmp_path / "data" / "dev.jsonl")]
        assert [str(p) for _, p in opts.models] == [str(tmp_path / "runs" / "r" / "student")]
    assert (sampled.decoding, sampled.temperature, sampled.seeds) == ("sample", 0.7, (10, 20, 30, 40, 50))
    assert greedy.decoding == "greedy"
    assert sampled.out != greedy.out and sampled.out.parent == greedy.out.parent


def test_paired_differences_by_sampling_seed(st):
    got = st.paired([10.0, 11.0, 12.0, 13.0, 14.0], [9.0, 11.0, 11.0, 12.0, 13.0])
    # differences 1, 0, 1, 1, 1: mean 0.8, sample sd sqrt(0.8 / 4), t(0.975, 4 df) = 2.776
    half = 2.776 * math.sqrt(0.8 / 4) / math.sqrt(5)
    assert got["mean"] == pytest.approx(0.8)
    assert (got["lo"], got["hi"]) == (pytest.approx(0.8 - half), pytest.approx(0.8 + half))
    assert (got["up"], got["n"]) == (4, 5)
    one = st.paired([3.0], [1.0])
    assert one["mean"] == 2.0 and one["lo"] is None and one["hi"] is None


def fake_evaluate(evaluate, predictions, calls):
    """Stands in for launch/evaluate.py: writes its results.json and predictions as the real one lays them
    out, each run predicting ``predictions[run][seed]`` for the one dev row (reference "cat on the mat")."""
    scores = {"cat on the mat": 100.0, "cat mat": 100 * 2 * (1.0 * 0.5) / 1.5}  # LCS 2: P 1, R 1/2

    def run(cmd, **kwargs):
        opts = evaluate.options_from_args(cmd[2:])
        (name, _), (set_name, _) = opts.models[0], opts.sets[0]
        calls.append((name, opts.decoding, opts.temperature))
        seeds = [None] if opts.decoding == "greedy" else list(opts.seeds)
        per_seed = []
        for seed in seeds:
            text = predictions[name]["greedy" if seed is None else seed]
            path = (
                opts.out
                / "predictions"
                / name
                / f"{set_name}.{'greedy' if seed is None else f'sample.seed{seed}'}.jsonl"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"prediction": text, "references": ["cat on the mat"]}) + "\n")
            per_seed.append(scores[text])
        record = {"seeds": seeds, "per_seed": per_seed, "mean": sum(per_seed) / len(per_seed), "n": 1}
        results = {"protocol": {"max_new_tokens": opts.max_new_tokens, "max_rows": opts.max_rows,
                                "decoding": opts.decoding, "temperature": opts.temperature},
                   "models": {name: {"rougeL": {set_name: {opts.decoding: record}}}}}  # fmt: skip
        (opts.out / "results.json").write_text(json.dumps(results))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_a_stopped_sweep_resumes_and_pairs_by_seed(st, evaluate, tmp_path, monkeypatch):
    out, records = tmp_path / "compare", tmp_path / "records"
    for run in ("base", "other"):
        (out / "runs" / run / "student").mkdir(parents=True)
    (out / "data").mkdir()
    (out / "data" / "dev.jsonl").write_text("")
    records.mkdir()
    predictions = {
        "base": dict.fromkeys([10, 20, 30, 40, 50, "greedy"], "cat on the mat"),
        "other": {
            10: "cat mat",
            20: "cat on the mat",
            30: "cat mat",
            40: "cat mat",
            50: "cat mat",
            "greedy": "cat mat",
        },
    }
    calls = []
    monkeypatch.setattr(st.subprocess, "run", fake_evaluate(evaluate, predictions, calls))
    monkeypatch.setattr(st.models, "load_tokenizer", lambda source: WordTokenizer())
    argv = ["--out", str(out), "--records", str(records), "--runs", "base", "other", "--temperatures", "0.7"]

    st.main(argv)
    assert sorted(calls) == sorted([("base", "sample", 0.7), ("base", "greedy", 1.0),
                                    ("other", "sample", 0.7), ("other", "greedy", 1.0)])  # fmt: skip
    calls.clear()
    st.main(argv)  # every pass is on disk: nothing runs again
    assert calls == []
    st.main([*argv[:-1], "0.7", "0.5"])  # a new temperature: only its passes run
    assert sorted(calls) == [("base", "sample", 0.5), ("other", "sample", 0.5)]

    with pytest.raises(SystemExit, match="delete it"):  # kept passes of 100 rows are not 50-row passes
        st.main([*argv, "--rows", "50"])

    saved = json.loads((records / "sampling_temperature.json").read_text())
    other = saved["other"]["T=0.7"]
    f_short = 100 * 2 / 3  # "cat mat" against "cat on the mat"
    assert other["per_seed"] == pytest.approx([f_short, 100.0, f_short, f_short, f_short])
    assert other["precision"] == pytest.approx(100.0)
    assert other["recall"] == pytest.approx((4 * 50.0 + 100.0) / 5)
    assert other["tokens"] == pytest.approx((4 * 2 + 4) / 5)
    assert saved["other"]["greedy"]["rougeL"] == pytest.approx(f_short)
    diffs = [f_short - 100, 0.0, f_short - 100, f_short - 100, f_short - 100]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    table = (records / "sampling_temperature.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| other |") and "up" in line)
    assert (
        f"{mean:+.2f} [{mean - 2.776 * sd / math.sqrt(5):+.2f}, {mean + 2.776 * sd / math.sqrt(5):+.2f}], 0 / 5 up"
        in row
    )


def test_bad_options_name_what_is_wrong(st, tmp_path):
    with pytest.raises(SystemExit, match="no student under"):
        st.main(["--out", str(tmp_path), "--runs", "missing"])
    with pytest.raises(SystemExit):
        st.main(["--out", str(tmp_path), "--temperatures", "0"])
