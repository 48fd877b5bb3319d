"""bench/compare_methods.py (issue 14): its reader of launch/evaluate.py's results, against the files the real
job writes, and its report statistics (weight choice, paired differences, t intervals, win counts) against
arithmetic written out here on fabricated records."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from _helpers import REPO, load_script
from transformers import AutoTokenizer

from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config

GPT2_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt2"
T975 = {2: 4.302653, 3: 3.182446, 4: 2.776445}  # Student-t 0.975 quantiles by degrees of freedom (tables)


@pytest.fixture(scope="module")
def cm():
    return load_script(REPO / "bench" / "compare_methods.py", "compare_methods_bench")


def test_evaluate_reads_what_the_evaluation_job_writes(cm, tmp_path):
    """The driver's table from the real job's results.json (the layout that once stopped the grid with a
    KeyError): per set NLL, greedy and sampled ROUGE-L, and the four-set average."""
    if not (GPT2_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"no GPT-2 tokenizer at {GPT2_TOKENIZER}")
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    config = tiny_config("gpt2", hidden_size=16, num_layers=1, num_heads=2, vocab_size=len(tokenizer),
                         max_positions=1024)  # fmt: skip
    model_dir = tmp_path / "model"
    build_causal_lm_from_config(config, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    sets = [a for s, f in cm.TEST_SETS.items() for a in ("--data", f"{s}={cm.DATA / f}")]
    launcher = load_script(REPO / "launch" / "evaluate.py", "evaluate_launcher")
    for metric, extra in (("nll", []), ("rouge", ["--decoding", "both", "--seeds", "1", "2"])):
        launcher.main(["--model", f"m={model_dir}", *sets, "--out", str(out / "eval" / "m" / metric), "--metrics",
                       metric, "--max-rows", "3", "--max-new-tokens", "4", "--batch-size", "2", "--no-progress",
                       *extra])  # fmt: skip
    args = cm.parse_args(["--out", str(out), "--records", str(tmp_path / "records")])
    (out / "eval" / "m" / "nll" / "driver.json").write_text('{"by_length": true}')  # as the driver leaves it
    table = cm.evaluate(out, "m", str(model_dir), args)  # both results on disk: nothing is run again
    nll = json.loads((out / "eval" / "m" / "nll" / "results.json").read_text())["models"]["m"]["nll"]
    rouge = json.loads((out / "eval" / "m" / "rouge" / "results.json").read_text())["models"]["m"]["rougeL"]
    for s in cm.TEST_SETS:
        assert table[s]["nll"] == nll[s]["nll"] and math.isfinite(nll[s]["nll"]) and nll[s]["n"] == 3
        assert table[s]["greedy"] == rouge[s]["greedy"]["per_seed"][0]
        assert table[s]["sample"] == pytest.approx(sum(rouge[s]["sample"]["per_seed"]) / 2)
    for key in ("greedy", "sample", "nll"):
        assert table["Avg"][key] == pytest.approx(sum(table[s][key] for s in cm.TEST_SETS) / 4)
    assert table["gen_batch_size"] == 16  # no driver.json: generated before the option existed
    assert table["nll_by_length"]


def _record(cm, args, method, weight, seed, final_dev, sample=None, nll=None, steps=60):
    name = cm.run_name(method, weight, seed, steps=steps)
    key = cm.METHODS[method][1]
    record = {"name": name, "student_sha256": "cut", "method": method, "weight": key and {key: weight},
              "seed": seed, "extra": None, "steps": steps, "dev_curve": [[0, 6.6], [steps, final_dev]],
              "median_step_s": 7.0, "wall_s": 600.0}  # fmt: skip
    if sample is not None:
        record["eval"] = {s: {"greedy": 10.0 + i, "sample": sample[i], "nll": nll[i]}
                          for i, s in enumerate(cm.TEST_SETS)}  # fmt: skip
        record["eval"]["Avg"] = {k: sum(record["eval"][s][k] for s in cm.TEST_SETS) / 4
                                 for k in ("greedy", "sample", "nll")}  # fmt: skip
        record["eval"]["seconds"] = {"nll": 100.0, "rouge": 200.0}
    if steps > 60:  # the longer run passes step 60 0.1 above where it ends
        record["dev_curve"].insert(1, [60, final_dev + 0.1])
    cm.save_record(args, name, record)


SELECTION = {"sft": {None: 3.9}, "fkl": {0.5: 3.8, 1.0: 3.7, 2.0: 3.75}, "rkl": {0.5: 3.95, 1.0: 3.9, 2.0: 4.0},
             "projector": {0.005: 4.0, 0.05: 4.1, 0.5: 4.2}, "cka": {0.005: 4.0, 0.05: 3.9, 0.5: 4.2},
             "flexkd": {0.005: 4.0, 0.05: 3.85, 0.5: 4.3}}  # fmt: skip  # final dev NLL per method and weight


def _selection(cm, args, **grids):
    """The 16 seed-1 selection records (60 steps): SELECTION, with some methods' grids replaced."""
    for method, grid in {**SELECTION, **grids}.items():
        for weight, final in grid.items():
            _record(cm, args, method, weight, 1, final)


def test_report_choice_paired_differences_and_counts(cm, tmp_path):
    args = cm.parse_args(["--records", str(tmp_path), "--seeds", "3", "--steps", "120", "--report"])
    _selection(cm, args)
    # rkl chose beta 1 here, so there is no separate control row; flexkd alpha 0.05, cka alpha 0.05
    rkl_sample = {1: [10.0, 8.0, 12.0, 9.0], 2: [11.0, 8.5, 12.5, 9.5], 3: [10.5, 7.0, 13.0, 9.0]}
    flex_sample = {1: [10.5, 8.5, 11.0, 9.5], 2: [11.2, 9.0, 12.0, 9.0], 3: [11.0, 7.5, 13.5, 10.0]}
    nll = [2.6, 2.8, 1.6, 2.7]
    for seed in (1, 2, 3):  # the final table's runs: 120 steps (--steps)
        _record(cm, args, "rkl", 1.0, seed, 3.8, rkl_sample[seed], nll, steps=120)
        _record(
            cm, args, "flexkd", 0.05, seed, 3.75, flex_sample[seed], [v - 0.01 * seed for v in nll], steps=120
        )
    _record(cm, args, "flexkd", 0.05, 2, 3.95)  # a 60-step seed 2, not in the final table
    _record(cm, args, "flexkd", 0.05, 1, 3.7, steps=240)  # the flattening check
    seed2 = cm.load_record(args, "flexkd-s120-a0.05-seed2")  # its curve dips below where it ends
    cm.save_record(
        args, seed2["name"], {**seed2, "dev_curve": [[0, 6.6], [60, 3.85], [100, 3.7], [120, 3.75]]}
    )
    text = cm.stage_report(args)
    assert result_names(tmp_path)["flexkd"] == [f"flexkd-s120-a0.05-seed{s}" for s in (1, 2, 3)]
    steps_block = text.split("## Training length")[1].split("\n## ")[0]
    # seed 1: the 60-step selection run ends at 3.85, the 120-step run at 3.75, the 240-step check at 3.70
    assert (
        "| row | seed | 60 steps | 120 steps | 240 steps | lowest of the 120-step curve, at step |"
        in steps_block
    )
    assert "| flexkd | 1 | 3.850 | 3.750 | 3.700 | 3.750 at 120 |" in steps_block
    assert "| flexkd | 2 | 3.950 | 3.750 |  | 3.700 at 100 |" in steps_block
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["chosen"] == {"sft": None, "fkl": 1.0, "rkl": 1.0, "projector": 0.005, "cka": 0.05,
                                "flexkd": 0.05}  # fmt: skip
    assert cm.CONTROL not in result["rows"]
    diffs = [sum(flex_sample[s]) / 4 - sum(rkl_sample[s]) / 4 for s in (1, 2, 3)]
    paired = result["paired"]["flexkd - rkl sample Avg"]
    mean = sum(diffs) / 3
    half = T975[2] * statistics.stdev(diffs) / math.sqrt(3)
    assert paired["mean"] == pytest.approx(mean) and paired["half_width"] == pytest.approx(half, rel=1e-4)
    assert paired["diffs"] == pytest.approx(diffs)
    nll_paired = result["paired"]["flexkd - rkl nll Dolly"]
    assert nll_paired["diffs"] == pytest.approx([-0.01, -0.02, -0.03])
    # (set, seed) pairs: sampled ROUGE-L higher for flexkd in 9 of 12, lower in 3; NLL lower in all 12
    wins = sum(flex_sample[s][i] > rkl_sample[s][i] for s in (1, 2, 3) for i in range(4))
    losses = sum(flex_sample[s][i] < rkl_sample[s][i] for s in (1, 2, 3) for i in range(4))
    assert (wins, losses) == (9, 3)
    sample_block = text.split("## Paired difference against rkl: sample")[1].split("\n## ")[0]
    assert "| flexkd | " in sample_block and sample_block.rstrip().endswith(f"| {wins} / {losses} |")
    nll_block = text.split("## Paired difference against rkl: nll")[1].split("\n## ")[0]
    assert nll_block.rstrip().endswith("| 12 / 0 |")
    # the Table-3 row: mean ± sample sd over the 3 training seeds
    avg = [sum(flex_sample[s]) / 4 for s in (1, 2, 3)]
    table = text.split("## ROUGE-L, sampled")[1].split("\n## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| flexkd |"))
    assert row.split("|")[-3].strip() == f"{sum(avg) / 3:.2f} ± {statistics.stdev(avg):.2f}"


def result_names(where: Path) -> dict:
    return json.loads((where / "report.json").read_text())["rows"]


def test_run_names_keep_the_selection_steps_unmarked(cm):
    assert cm.run_name("flexkd", 0.05, 2) == "flexkd-a0.05-seed2"  # 60 steps: the selection's protocol
    assert cm.run_name("flexkd", 0.05, 2, "flexkd-local", 120) == "flexkd-local-s120-a0.05-seed2"
    assert cm.run_name("sft", None, 1, steps=240) == "sft-s240-seed1"


def test_records_of_another_setup_are_ignored(cm, tmp_path):
    args = cm.parse_args(["--records", str(tmp_path), "--report"])
    _record(cm, args, "sft", None, 1, 3.9)
    assert cm.load_record(args, "sft-seed1")["dev_curve"][-1][1] == 3.9
    other = cm.parse_args(["--records", str(tmp_path), "--report", "--rouge-rows", "50"])
    assert cm.load_record(other, "sft-seed1") is None  # another evaluation protocol: not comparable
    assert math.isnan(cm.t_interval([1.0])[1])  # one value: no interval


def test_time_limit_starts_only_the_jobs_the_records_say_fit(cm, tmp_path, capsys):
    records, out = tmp_path / "records", tmp_path / "out"

    def parse(*extra):
        return cm.parse_args(
            ["--records", str(records), "--out", str(out), "--seeds", "2", "--dry-run", *extra]
        )

    args = parse()
    _selection(cm, args)  # 60 steps, 600 s each
    for method, weight, wall in (("rkl", 1.0, 2300.0), ("flexkd", 0.05, 2900.0)):  # seed 1 at 240 steps
        _record(cm, args, method, weight, 1, 3.7, steps=240)
        name = cm.run_name(method, weight, 1, steps=240)
        cm.save_record(args, name, {**cm.load_record(args, name), "wall_s": wall})
    (out / "runs" / "rkl-s240-b1-seed1" / "student").mkdir(parents=True)
    (out / "runs" / "rkl-s240-b1-seed1" / "student" / "config.json").write_text("{}")
    evals = {"cut": (450.0, 1800.0), "sft-seed1": (500.0, 2000.0)}  # what two evaluations took
    for name, (nll, rouge) in evals.items():
        record = cm.load_record(args, name) or {"name": name, "student_sha256": "cut"}
        cm.save_record(args, name, {**record, "eval": {"seconds": {"nll": nll, "rouge": rouge}, "nll_by_length": True}})  # fmt: skip
    cm.save_record(
        args, cm.PAIRING_CHECK, {"name": cm.PAIRING_CHECK, "student_sha256": "cut", "identical": True}
    )

    # the longest measurement of the same kind: method and length, else length, else the slowest rate
    assert cm.estimate_s(args, "train", "flexkd", 240) == 2900.0
    assert cm.estimate_s(args, "train", "sft", 240) == 2900.0
    assert cm.estimate_s(args, "train", "sft", 120) == pytest.approx(
        max(600 / 60, 2300 / 240, 2900 / 240) * 120
    )
    assert cm.estimate_s(args, "nll") == 500.0 + 60 and cm.estimate_s(args, "rouge") == 2000.0 + 60

    def commands():
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]

    # stage first: sft, fkl, projector, cka and flexkd-local still to train at 240 steps (~2900 s each)
    capsys.readouterr()
    tight = parse("--time-limit", "45")
    cm.stage_first(out.resolve(), tight)
    assert commands() == [] and len(tight.skipped) == 5
    roomy = parse("--time-limit", "50")
    cm.stage_first(out.resolve(), roomy)
    assert len(commands()) == 5 and roomy.skipped == []
    # stage grid with 20 min: no training, no ROUGE-L pass (~34 min); the NLL passes (~9 min) of the teacher
    # and of the one trained run of the table
    grid = parse("--time-limit", "20")
    cm.stage_grid(out.resolve(), grid)
    ran = commands()
    assert len(ran) == 2 and all("launch/evaluate.py" in c and "--metrics nll" in c for c in ran)
    assert "--model=teacher=" in ran[0] and "--model=rkl-s240-b1-seed1=" in ran[1]
    assert any(s.startswith("eval-teacher-rouge ") for s in grid.skipped)
    assert any(s.startswith("sft-s240-seed1 ") for s in grid.skipped)
    # without a limit: seed 1 keeps the yaml's dev point every 10 steps, later seeds take one every 30
    cm.stage_grid(out.resolve(), parse())
    trains = [c for c in commands() if "launch/distill.py" in c]
    # first rkl's unused grid weights (it chose beta 1 here: 0.5 and 2) at 240 steps, seed 1, dev only; then
    # seed 1: all rows but rkl (its student is there; flexkd's record is, its student is not); seed 2: all 7
    assert len(trains) == 2 + 6 + 7
    assert all(
        f"output_dir={out.resolve()}/runs/rkl-s240-b{w}-seed1 " in c
        for w, c in zip(("0.5", "2"), trains[:2], strict=True)
    )
    assert all("train.max_steps=240" in c for c in trains[:2])
    later = [c for c in trains if " seed=2 " in c]
    assert len(later) == 7 and all(" train.eval_every=30 " in c + " " for c in later)
    assert not any("eval_every" in c for c in trains if " seed=1 " in c)


def test_evaluation_estimates_come_from_this_protocols_runs_when_there_are_any(cm, tmp_path):
    """The 60-step protocol's evaluations ran on a machine half as fast; once runs at ``--steps`` have been
    evaluated, their times alone set the estimate (else the last hour of a session refused every ROUGE-L pass,
    at ~57 min estimated for a ~15 min job)."""
    args = cm.parse_args(
        ["--records", str(tmp_path / "records"), "--out", str(tmp_path / "out"), "--dry-run"]
    )
    _selection(cm, args)  # 60 steps
    old = cm.load_record(args, cm.run_name("sft", None, 1))
    cm.save_record(args, old["name"], {**old, "eval": {"seconds": {"nll": 900.0, "rouge": 3300.0}}})
    assert cm.estimate_s(args, "rouge") == 3300.0 + 60 and cm.estimate_s(args, "nll") == 900.0 + 60
    for method, weight, (nll, rouge) in (("rkl", 1.0, (210.0, 880.0)), ("flexkd", 0.05, (530.0, 950.0))):
        _record(cm, args, method, weight, 1, 3.7, steps=args.steps)
        name = cm.run_name(method, weight, 1, steps=args.steps)
        record = cm.load_record(args, name)
        cm.save_record(args, name, {**record, "eval": {"seconds": {"nll": nll, "rouge": rouge}}})
    assert cm.estimate_s(args, "rouge") == 950.0 + 60 and cm.estimate_s(args, "nll") == 530.0 + 60


def test_time_limit_must_be_positive(cm):
    with pytest.raises(SystemExit):
        cm.parse_args(["--time-limit", "0"])


def test_cache_fingerprint_and_the_report_line(cm, tmp_path):
    """The records name the teacher cache they read: one hash of the shards' sha256 values, in file order,
    changed by any shard; the report lists the caches when the trained runs read more than one."""
    import hashlib

    out = tmp_path / "out"
    assert cm.cache_sha256(out) is None  # no cache built here
    cache = out / "cache-bf16"
    cache.mkdir(parents=True)
    for i, digest in enumerate(("aa" * 32, "bb" * 32)):
        (cache / f"shard-r{i:05d}-s00000.json").write_text(
            json.dumps({"file": f"s{i}.safetensors", "sha256": digest})
        )
    expected = hashlib.sha256(f"s0.safetensors:{'aa' * 32}\ns1.safetensors:{'bb' * 32}".encode()).hexdigest()[
        :16
    ]
    assert cm.cache_sha256(out) == expected
    (cache / "shard-r00001-s00000.json").write_text(
        json.dumps({"file": "s1.safetensors", "sha256": "cc" * 32})
    )
    assert cm.cache_sha256(out) != expected

    args = cm.parse_args(["--records", str(tmp_path / "records"), "--report"])
    _record(cm, args, "sft", None, 1, 3.9)
    _record(cm, args, "rkl", 0.5, 1, 3.8)
    assert "Teacher caches" not in cm.stage_report(args)  # one cache, not recorded
    record = json.loads(cm.record_path(args, cm.run_name("rkl", 0.5, 1)).read_text())
    cm.save_record(args, record["name"], {**record, "cache_sha256": expected})
    text = cm.stage_report(args)
    assert f"`{expected}` 1" in text and "`not recorded` 1" in text


def test_an_rkl_weight_that_wins_at_the_final_length_becomes_a_row_and_a_base(cm, tmp_path):
    """rkl chose beta 0.5 at 60 steps; beta 1 is a row anyway (the control). Beta 2 is rechecked: a row only
    once its seed-1 run at --steps ends below both rkl rows' seed 1 there, and then every row is also paired
    against it."""
    args = cm.parse_args(["--records", str(tmp_path), "--seeds", "2", "--steps", "240", "--report"])
    _selection(cm, args, rkl={0.5: 3.95, 1.0: 4.0, 2.0: 4.1})  # rkl chooses beta 0.5
    assert cm.rkl_rechecks(args) == [2.0]
    assert cm.recheck_rows(args) == []  # nothing at 240 steps yet
    _record(cm, args, "rkl", 2.0, 1, 3.70, steps=240)
    assert cm.recheck_rows(args) == []  # the rows it must beat have not run at 240 yet
    _record(cm, args, "rkl", 0.5, 1, 3.746, steps=240)
    _record(cm, args, "rkl", 1.0, 1, 3.721, steps=240)
    assert cm.recheck_rows(args) == [2.0]
    assert cm.final_runs(args)["rkl (beta 2)"] == ["rkl-s240-b2-seed1", "rkl-s240-b2-seed2"]
    _record(cm, args, "rkl", 2.0, 1, 3.725, steps=240)  # between the two rkl rows: not a row
    assert cm.recheck_rows(args) == [] and "rkl (beta 2)" not in cm.final_runs(args)

    sample, nll = [10.0, 8.0, 12.0, 9.0], [2.6, 2.8, 1.6, 2.7]
    for seed in (1, 2):
        _record(cm, args, "rkl", 2.0, seed, 3.70, sample, nll, steps=240)
        _record(cm, args, "flexkd", 0.05, seed, 3.68, [v + seed for v in sample], nll, steps=240)
    text = cm.stage_report(args)
    block = text.split("## Paired difference against rkl (beta 2): sample")[1].split("\n## ")[0]
    assert "| flexkd | +1.500 [" in block and block.rstrip().endswith("| 8 / 0 |")
