"""Evaluation: rows, ROUGE-L against rouge-score called directly, response NLL against float64 math,
batched vs one-at-a-time generation, seeded sampling, the job's tables, bad inputs, and ZeRO-3 (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import REPO, job_command, job_env
from rouge_score import rouge_scorer
from transformers import AutoTokenizer

from flexkd_ds.evaluation.generation import filtered_probs, generate
from flexkd_ds.evaluation.metrics import (
    EvalRow,
    NLLResult,
    load_eval_rows,
    nll_batches,
    response_nll,
    rouge_l,
    rouge_l_parts,
)
from flexkd_ds.inputs import data
from flexkd_ds.inputs.byte_tokenizer import byte_tokenizer
from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config
from flexkd_ds.jobs.evaluate import EvalOptions, parse_named, prediction_path, run_evaluate

INSTRUCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"
GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
EVALUATE = "launch/evaluate.py"
PROMPTS = [
    "Hello there",
    "A much longer prompt, with many more bytes in it.",
    "x",
    "What is 2+2?",
    "Name a fruit",
]


def _byte_model(seed: int = 0):
    """A random 2-layer LLaMA over the built-in byte tokenizer (its specials as the model's ids)."""
    config = tiny_config("llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=259, max_positions=1024,
                         bos_token_id=257, eos_token_id=258, pad_token_id=256)  # fmt: skip
    return build_causal_lm_from_config(config, seed=seed).eval()


def _unigram_gpt2(tokenizer):
    """A GPT-2 whose next-token distribution is fixed: ln_f's gain is 0, so its output is its bias e_0 and the
    logits are column 0 of the (tied) head: common English words, " the" most likely, EOS sometimes. Its
    samples share words with real references (non-zero, seed-dependent ROUGE-L)."""
    config = tiny_config("gpt2", hidden_size=16, num_layers=1, num_heads=2, vocab_size=len(tokenizer),
                         max_positions=1024)  # fmt: skip
    model = build_causal_lm_from_config(config, seed=0)
    words = [" the", " a", " of", " and", " to", " is", " in", " it", " you", " for", " water", " not"]
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        head = model.get_output_embeddings().weight
        head[:, 0] = -30.0
        for word in words:
            head[tokenizer.encode(word)[0], 0] = 0.0
        head[tokenizer.encode(" the")[0], 0] = 0.7
        head[tokenizer.eos_token_id, 0] = -1.0
    return model.eval()


def _gpt2_tokenizer():
    if not (GPT2_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"no GPT-2 tokenizer at {GPT2_TOKENIZER}")
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


def _direct_rouge(prediction: str, references) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


# ------------------------------------------------------------------------------------------ rows, ROUGE


def test_load_eval_rows_keeps_every_reference():
    path = INSTRUCT / "sinst_valid.jsonl"
    rows = load_eval_rows(path, max_rows=5)
    raw = [json.loads(line) for line in path.read_text().splitlines()[:5]]
    assert [r.prompt for r in rows] == [rec["prompt"] for rec in raw]
    assert [list(r.references) for r in rows] == [rec["output"] for rec in raw]  # lists in S-NI
    assert rows[0].source == "sinst_valid.jsonl:1" and rows[4].source == "sinst_valid.jsonl:5"
    dolly = load_eval_rows(INSTRUCT / "dolly_valid.jsonl", max_rows=2)
    first = json.loads((INSTRUCT / "dolly_valid.jsonl").read_text().splitlines()[0])
    assert dolly[0].references == (first["output"],) and dolly[0].prompt == first["prompt"]


def test_rouge_l_is_rouge_score_best_over_references():
    predictions = ["The cat sat on the mat", "dogs were running fast", "", "completely unrelated words"]
    references = [
        ["a bird flew away", "The cat sat on the mat"],  # second reference matches exactly -> 100
        ["the dog runs fast"],  # stemming: running -> run, dogs -> dog
        ["anything"],
        ["some words", "unrelated"],
    ]
    got = rouge_l(predictions, references)
    assert got[0] == pytest.approx(100.0)
    assert got == pytest.approx([_direct_rouge(p, r) for p, r in zip(predictions, references, strict=True)])
    lcs = 3 / 4  # "dog run fast" of 4 tokens each side (stemmed): P = R = F = 3/4
    assert got[1] == pytest.approx(100 * lcs)
    assert got[2] == 0.0
    assert got[3] > _direct_rouge(predictions[3], ["some words"])  # max, not the first reference
    with pytest.raises(ValueError, match="predictions"):
        rouge_l(["a"], [])


def test_rouge_l_parts_are_the_lcs_over_each_side_of_the_best_reference():
    # stemmed tokens: "the cat sat on the mat" (6) against "the cat is on a mat" (6) and "cats on mats" (3);
    # LCS "the cat on mat" = 4 with the first: P = R = 4/6, F = 4/6; "cat on mat" = 3 with the second:
    # P = 3/6, R = 3/3, F = 2PR / (P + R) = 2/3 too, so the first reference (F ties) is the one reported.
    # A prediction of 2 tokens against 5: LCS 2 -> P = 1, R = 2/5, F = 2 * 0.4 / 1.4.
    predictions = ["The cat sat on the mat", "cat mat"]
    references = [["the cat is on a mat", "cats on mats"], ["a cat on the mat"]]
    parts = rouge_l_parts(predictions, references)
    assert parts[0] == pytest.approx((100 * 4 / 6, 100 * 4 / 6, 100 * 4 / 6))
    assert parts[1] == pytest.approx((100.0, 40.0, 100 * 0.8 / 1.4))
    assert [f for _, _, f in parts] == rouge_l(predictions, references)
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l_parts(["a"], ["a reference string, not a list"])


# -------------------------------------------------------------------------------------------------- NLL


def test_response_nll_equals_float64_cross_entropy():
    tokenizer, model = byte_tokenizer(), _byte_model()
    rows = load_eval_rows(INSTRUCT / "dolly_valid.jsonl", max_rows=5)
    got = response_nll(model, nll_batches(rows, tokenizer, max_length=400, batch_size=2))
    expected_sum, expected_tokens = 0.0, 0
    for row in rows:  # one unpadded sequence at a time, cross-entropy written out in float64
        ex = data.encode_example(row.prompt, row.references[0], tokenizer, max_length=400)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()  # (T, V)
        for t, label in enumerate(ex["labels"]):
            if label != -100:
                expected_sum += float(torch.logsumexp(logits[t], 0) - logits[t, label])
                expected_tokens += 1
    assert got.tokens == expected_tokens
    assert got.nll_sum == pytest.approx(expected_sum, rel=1e-5)
    assert got.mean == pytest.approx(expected_sum / expected_tokens, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(expected_sum / expected_tokens), rel=1e-5)
    # placeholder batches (ZeRO-3 padding) add no token and no loss
    padded = response_nll(model, nll_batches(rows, tokenizer, max_length=400, batch_size=2, num_batches=5))
    assert padded.tokens == got.tokens and padded.nll_sum == pytest.approx(got.nll_sum, rel=1e-6)
    assert (NLLResult(1.0, 2) + NLLResult(3.0, 2)).mean == 1.0
    # batched by length (what the job does): the same sum, and less padding than file order
    batches = list(nll_batches(rows, tokenizer, max_length=400, batch_size=2, by_length=True))
    sorted_result = response_nll(model, batches)
    assert sorted_result.tokens == got.tokens and sorted_result.nll_sum == pytest.approx(
        expected_sum, rel=1e-5
    )
    lengths = sorted(len(data.encode_example(r.prompt, r.references[0], tokenizer, max_length=400)["input_ids"])
                     for r in rows)  # fmt: skip
    assert [b["input_ids"].shape[1] for b in batches] == [max(lengths[i : i + 2]) for i in range(0, 5, 2)]
    assert [int(b["attention_mask"].sum()) for b in batches] == [
        sum(lengths[i : i + 2]) for i in range(0, 5, 2)
    ]


# ------------------------------------------------------------------------------------------- generation


def test_batched_left_padded_greedy_equals_one_at_a_time():
    tokenizer, model = byte_tokenizer(), _byte_model(seed=3)
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, progress=False)
    single = [
        generate(model, tokenizer, [p], max_new_tokens=10, batch_size=1, progress=False)[0] for p in PROMPTS
    ]
    assert batched == single
    assert len(set(batched)) > 1  # the prompts really lead to different continuations


def test_prompts_longer_than_the_position_limit_keep_their_end():
    config = tiny_config("llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=259, max_positions=48,
                         bos_token_id=257, eos_token_id=258, pad_token_id=256)  # fmt: skip
    model, tokenizer = build_causal_lm_from_config(config, seed=1).eval(), byte_tokenizer()
    long_prompt = "".join(chr(97 + i % 26) for i in range(100))
    got = generate(model, tokenizer, [long_prompt, "hi"], max_new_tokens=8, batch_size=2, progress=False)
    # 48 positions - 8 new tokens = 40 prompt tokens: BOS + the last 39 bytes
    assert got[0] == generate(model, tokenizer, [long_prompt[-39:]], max_new_tokens=8, progress=False)[0]
    with pytest.raises(ValueError, match="no room for a prompt"):
        generate(model, tokenizer, ["hi"], max_new_tokens=48, progress=False)


def test_sampling_reproducible_per_seed_and_batch_size():
    tokenizer, model = byte_tokenizer(), _byte_model(seed=3)

    def sample(seed, batch_size):
        return generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=batch_size, do_sample=True,
                        seed=seed, progress=False)  # fmt: skip

    first = sample(7, 2)
    assert sample(7, 2) == first
    assert sample(7, 5) == first  # per-example generators: independent of the batching
    other = sample(8, 2)
    assert sum(a != b for a, b in zip(first, other, strict=True)) >= 4
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=10, progress=False)
    assert greedy != first
    with pytest.raises(ValueError, match="seed"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=4, do_sample=True)


def test_filtered_probs_top_k_top_p_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(logits, -1)
    top2 = filtered_probs(logits, temperature=1.0, top_p=1.0, top_k=2)
    assert torch.allclose(top2, torch.tensor([[p[0, 0], p[0, 1], 0, 0]]).float() / (p[0, 0] + p[0, 1]))
    # nucleus 0.7: p = (.644, .237, .087, .032): the first two reach 0.7
    nucleus = filtered_probs(logits, temperature=1.0, top_p=0.7, top_k=0)
    assert torch.allclose(nucleus, top2)
    assert torch.allclose(
        filtered_probs(logits, temperature=1.0, top_p=0.5, top_k=0), torch.tensor([[1.0, 0, 0, 0]])
    )
    hot = filtered_probs(logits, temperature=2.0, top_p=1.0, top_k=0)
    assert torch.allclose(hot, torch.softmax(logits / 2, -1).float())


def test_tokenizer_without_pad_token():
    tokenizer = _gpt2_tokenizer()
    assert tokenizer.pad_token is None
    model = _unigram_gpt2(tokenizer)
    texts = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=6, batch_size=3, progress=False)
    assert texts == ["the the the the the the"] * 3  # greedy argmax of the fixed distribution
    assert tokenizer.pad_token is None  # the caller's tokenizer is untouched
    rows = [EvalRow("Say it:", ("the water",), "mem:1")]
    nll = response_nll(model, nll_batches(rows, tokenizer, max_length=64, batch_size=1))
    ids = [*tokenizer.encode("the water"), tokenizer.eos_token_id]  # "the", " water", EOS
    assert nll.tokens == len(ids) == 3
    logp = torch.log_softmax(model.get_output_embeddings().weight[:, 0].detach().double(), 0)  # fixed
    assert nll.nll_sum == pytest.approx(-float(sum(logp[i] for i in ids)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- the job


def _load_launcher():
    spec = importlib.util.spec_from_file_location("evaluate_launcher", REPO / EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _md_cells(md: str, title_start: str) -> dict[str, list[str]]:
    """{model: cells} of the Markdown table under the heading starting with ``title_start``."""
    block = md.split(f"## {title_start}")[1].split("\n## ")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_job_tables_agree_with_rouge_score_on_saved_predictions(tmp_path):
    tokenizer = _gpt2_tokenizer()
    model_dir = tmp_path / "unigram"
    _unigram_gpt2(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out, seeds = tmp_path / "eval", [1, 2, 3]
    sets = {"dolly": INSTRUCT / "dolly_valid.jsonl", "sinst": INSTRUCT / "sinst_valid.jsonl"}
    argv = ["--model", f"uni={model_dir}", "--model", f"uni2={model_dir}", "--out", str(out), "--decoding", "both",
            "--seeds", *map(str, seeds), "--max-rows", "6", "--max-new-tokens", "12", "--batch-size", "4",
            "--no-progress"] + [a for name, path in sets.items() for a in ("--data", f"{name}={path}")]  # fmt: skip
    _load_launcher().main(argv)
    results = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert list(results["models"]) == ["uni", "uni2"]
    for decoding, title, run_seeds in (
        ("sample", "ROUGE-L (sampled", seeds),
        ("greedy", "ROUGE-L (greedy", [None]),
    ):
        table = _md_cells(md, title)
        per_set_seed = {}
        for set_name, path in sets.items():
            refs = [list(r.references) for r in load_eval_rows(path, max_rows=6)]
            means = []
            for seed in run_seeds:
                lines = prediction_path(out, "uni", set_name, decoding, seed).read_text().splitlines()
                records = [json.loads(line) for line in lines]
                assert [r["references"] for r in records] == refs
                direct = [_direct_rouge(r["prediction"], r["references"]) for r in records]
                assert [r["rougeL"] for r in records] == pytest.approx(direct)
                means.append(float(np.mean(direct)))
            stats = results["models"]["uni"]["rougeL"][set_name][decoding]
            assert stats["per_seed"] == pytest.approx(means) and stats["n"] == 6
            assert stats["mean"] == pytest.approx(np.mean(means)) and stats["std"] == pytest.approx(
                np.std(means)
            )
            column = list(sets).index(set_name)
            assert table["uni"][column] == f"{np.mean(means):.2f} ± {np.std(means):.2f}"
            per_set_seed[set_name] = means
        average = np.mean([per_set_seed[s] for s in sets], axis=0)  # per seed, over sets
        assert table["uni"][-1] == f"{average.mean():.2f} ± {average.std():.2f}"
        assert table["uni2"] == table["uni"]  # the same model under two names: the same numbers
        if decoding == "sample":
            assert np.std(per_set_seed["dolly"]) > 0 and min(per_set_seed["dolly"]) > 0  # a meaningful check
    nll_table = _md_cells(md, "Response NLL")
    for column, set_name in enumerate(sets):
        nll = results["models"]["uni"]["nll"][set_name]
        assert nll["ppl"] == pytest.approx(math.exp(nll["nll"]))
        assert nll_table["uni"][column] == f"{nll['nll']:.4f} ({nll['ppl']:.2f})"


def test_bad_inputs_give_clear_errors(tmp_path, capsys, caplog):
    with pytest.raises(data.DataError, match=r"test file not found: .*nope\.jsonl"):
        load_eval_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(data.DataError, match=r"bad\.jsonl, row 2: missing 'output'"):
        load_eval_rows(bad)
    for spec in ("nosource", "=path", "name="):
        with pytest.raises(ValueError, match="--model expects NAME=SOURCE"):
            parse_named("--model", spec)
    with pytest.raises(ValueError, match="must be letters"):
        parse_named("--data", "a/b=x.jsonl")
    with pytest.raises(ValueError, match=r"duplicate --model names \['m'\]"):
        EvalOptions(models=(("m", "x"), ("m", "y")), sets=(("s", "p"),), out=tmp_path)
    launcher = _load_launcher()
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["--model", "just-a-path", "--data", f"s={bad}", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "--model expects NAME=SOURCE" in capsys.readouterr().err
    argv = ["--model", f"m={tmp_path / 'missing_model'}", "--out", str(tmp_path / "o2"), "--data"]
    for data_spec, message in ((f"s={tmp_path / 'gone.jsonl'}", r"--data s: test file not found: .*gone\.jsonl"),
                               (f"s={bad}", r"--data s: .*bad\.jsonl, row 2: missing 'output'"),
                               (f"s={INSTRUCT / 'dolly_valid.jsonl'}", r"--model m=.*missing_model")):  # fmt: skip
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            launcher.main([*argv, data_spec])
        assert exit_info.value.code == 2
        assert re.search(message, caplog.text), message
    assert not (tmp_path / "o2").exists()  # refused before anything was written


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(tmp_path):
    model_dir = tmp_path / "tiny"
    _byte_model(seed=5).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    common = ["--model", f"tiny={model_dir}", "--data", f"dolly={INSTRUCT / 'dolly_valid.jsonl'}",
              "--data", f"vicuna={INSTRUCT / 'vicuna_valid.jsonl'}", "--max-rows", "5", "--decoding", "both",
              "--seeds", "4", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress"]  # fmt: skip
    single = run_evaluate(_load_launcher().options_from_args([*common, "--out", str(tmp_path / "single")]))
    cmd = job_command(EVALUATE, [*common, "--out", str(tmp_path / "zero3"), "--zero3"], nprocs=2)
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sharded = json.loads((tmp_path / "zero3" / "results.json").read_text())
    for set_name in ("dolly", "vicuna"):
        for decoding, seed in (("greedy", None), ("sample", 4)):
            a = prediction_path(tmp_path / "single", "tiny", set_name, decoding, seed).read_text()
            b = prediction_path(tmp_path / "zero3", "tiny", set_name, decoding, seed).read_text()
            assert b == a, f"{set_name} {decoding}: ZeRO-3 predictions differ from the single-process run"
        nll_single, nll_sharded = (
            single["models"]["tiny"]["nll"][set_name],
            sharded["models"]["tiny"]["nll"][set_name],
        )
        assert nll_sharded["tokens"] == nll_single["tokens"]
        assert nll_sharded["nll"] == pytest.approx(nll_single["nll"], rel=1e-5)
