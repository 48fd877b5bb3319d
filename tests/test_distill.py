"""End-to-end tests of the distill and score jobs (DESIGN.md "Engines", "Artifacts").

Multi-rank tests are real ``deepspeed`` launches: 2 CPU ranks over gloo, the teacher a ZeRO-3 inference engine,
the student at ZeRO-2 or ZeRO-3, the tiny recipe with small overrides. Their results are compared with
independent single-process computations written here in plain torch / transformers (the same tiny models, the
same examples), not with the code under test run a second way.

Every test that starts a 2-rank launch is ``slow`` except ``test_distill_two_ranks_zero2_end_to_end``, the
default-suite smoke; the default part of this file (that smoke and the bad-input tests) takes about a minute on
2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import (
    DISTILL,
    RECIPE,
    REPO,
    SCORE,
    assert_states_close,
    finite,
    job_command,
    job_env,
    kill_tree,
    read_metrics,
    run_job,
    start_job,
    student_state,
)

from flexkd_ds.inputs import data
from flexkd_ds.inputs.config import load_config
from flexkd_ds.jobs.common import model_specs, train_dataset
from flexkd_ds.method import importance
from flexkd_ds.runtime.dist import DistEnv

METRIC_KEYS = ("step", "lr", "loss", "lm", "logit", "feature", "tokens_per_s", "teacher_ms", "student_ms", "step_ms",
               "time")
IMPORTANCE_METADATA = ("teacher", "layer", "functional", "num_examples", "num_tokens", "d_T", "d_S", "tail_mass",
                       "dataset", "seed", "created_by")  # fmt: skip
D_T, D_S, VOCAB = 64, 32, 259  # the tiny recipe's teacher / student widths and byte vocabulary
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
JOB_TIMEOUT = 300


# ------------------------------------------------------------------------------------- independent helpers


def recipe_config(output_dir, overrides=()):
    return load_config(RECIPE, [f"output_dir={output_dir}", *overrides])


def tiny_dataset(cfg):
    """The job's training examples (the data pipeline is tested in test_data.py; here we need the same rows)."""
    _, _, tokenizer = model_specs(cfg)
    dataset = train_dataset(cfg, tokenizer, CPU)
    assert len(dataset) == cfg.data.num_synthetic  # what rank_streams assumes
    return dataset


def test_holdout_validation_is_a_seeded_slice_or_none_on_too_small_a_training_set(tmp_path):
    """data.valid=holdout (the default for one's own data): data.valid_holdout training rows, not trained on;
    with fewer than 10x as many rows nothing is held out and there is no validation set (this used to stop
    the job with "InstructionDataset needs at least one row")."""
    _, _, tokenizer = model_specs(recipe_config(tmp_path))
    small = recipe_config(tmp_path, ["data.valid=holdout"])  # 200 rows < 10 x 64
    assert train_dataset(small, tokenizer, CPU, valid=True) is None
    assert len(train_dataset(small, tokenizer, CPU)) == 200  # all trained on
    cfg = recipe_config(tmp_path, ["data.valid=holdout", "data.valid_holdout=20"])
    valid, train = train_dataset(cfg, tokenizer, CPU, valid=True), train_dataset(cfg, tokenizer, CPU)
    assert (len(valid), len(train)) == (20, 180)
    everything = recipe_config(tmp_path, ["data.valid=null"])
    all_ids = [tuple(e["input_ids"]) for e in train_dataset(everything, tokenizer, CPU)]
    held = [tuple(e["input_ids"]) for e in valid]
    kept = [tuple(e["input_ids"]) for e in train]
    assert sorted(held + kept) == sorted(all_ids)  # a split of the same rows (the generator repeats some)


def test_scoring_leaves_no_hook_and_no_hidden_state_on_the_teacher(tmp_path):
    """The importance pass reads the teacher's LM-head input through a hook; when it ends the hook is gone
    (it used to stay for the whole run, keeping the last hidden state alive)."""
    from flexkd_ds.jobs.score import score_teacher

    cfg = recipe_config(tmp_path, ["importance.num_examples=4"])
    teacher, _, tokenizer = model_specs(cfg)
    model = teacher.load(torch.float32).eval()

    class PlainEngine:  # what score_teacher uses of the ZeRO-3 engine: call it, and .module
        module = model

        def __call__(self, **kwargs):
            return model(**kwargs)

    accumulator = score_teacher(cfg, PlainEngine(), tiny_dataset(cfg), CPU, data.pad_token_id(tokenizer))
    assert accumulator.num_examples == 4
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_recompute_never_overwrites_an_importance_file_given_as_input(tmp_path):
    """importance.path into another run + importance.recompute=true: that file is left byte for byte; the
    new scores are written to this run's output_dir and used (they used to overwrite the other run's file)."""
    run_job(DISTILL, tmp_path / "a", ["train.max_steps=1", "importance.num_examples=8"], nprocs=1)
    theirs = tmp_path / "a" / "importance.safetensors"
    before = theirs.read_bytes()
    args = [
        "train.max_steps=1",
        f"importance.path={theirs}",
        "importance.recompute=true",
        "importance.num_examples=16",
    ]
    result = run_job(DISTILL, tmp_path / "b", args, nprocs=1)
    assert theirs.read_bytes() == before
    mine = read_importance(tmp_path / "b" / "importance.safetensors")[1]
    assert mine["num_examples"] == "16" and "is an input, left as it is" in result.output


def test_a_rerun_with_another_config_stops_before_writing_and_a_longer_one_continues(tmp_path):
    """Same output_dir, loss.alpha changed: stopped before anything is written, naming the key and both ways
    out (it used to train 0 steps, exit 0 and rewrite config.resolved.yaml with the new value). Raising
    train.max_steps continues from the checkpoint, and each segment's resolved config is kept."""
    out = tmp_path / "run"
    first = run_job(DISTILL, out, ["train.max_steps=2", "importance.num_examples=8"], nprocs=1)
    # the end of a run says what it did and where everything is, and draws the curves
    assert re.search(r"done: steps 1\.\.2 in \d+ s, [\d,]+ response tokens", first.output), first.tail()
    assert re.search(r"loss terms, first -> last step: loss [\d.]+ -> [\d.]+; lm ", first.output)
    assert (
        f"student {out / 'student'}; metrics {out / 'metrics.jsonl'}; plot {out / 'metrics.png'}"
        in first.output
    )
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    changed = run_job(DISTILL, out, ["train.max_steps=2", "importance.num_examples=8", "loss.alpha=0.1"],
                      nprocs=1, check=False)  # fmt: skip
    assert changed.returncode != 0 and "loss.alpha: 0.05 -> 0.1" in changed.output, changed.tail()
    assert "Use a new output_dir, or train.resume=never" in changed.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    longer = run_job(DISTILL, out, ["train.max_steps=3", "importance.num_examples=8"], nprocs=1)
    assert "at step 2" in longer.output and [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert "max_steps: 2" in (out / "config.resolved.1.yaml").read_text()
    assert "max_steps: 3" in (out / "config.resolved.yaml").read_text()
    exported = json.loads((out / "student" / "config.json").read_text())  # its own name, not the teacher's
    assert exported["_model_name_or_path"].startswith("student distilled (flexkd-ds) of random:")
    assert exported["flexkd_ds"]["steps"] == 3 and exported["flexkd_ds"]["teacher"].startswith("random:")


def test_an_expected_error_on_two_ranks_is_one_line_without_traceback(tmp_path):
    """A data error on both ranks: the output ends with one 'distill.py: error: ...' line naming the file
    and the fix, no traceback (it used to print one full traceback per rank), and a non-zero exit."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi."}) + "\n")  # no output column
    result = run_job(DISTILL, tmp_path / "o", [f"data.train={rows}", "data.responses=dataset"], nprocs=2,
                     check=False)  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.output.splitlines() if "distill.py: error:" in line]
    assert len(errors) == 1 and str(rows) in errors[0], result.tail()
    assert "Traceback" not in result.output


@pytest.mark.parametrize("world_size, config, hinted", [
    (1, "ds_configs/student_zero2.json", True), (1, "ds_configs/student_zero0.json", False),
    (2, "ds_configs/student_zero2.json", False), (1, "ds_configs/student_zero3.json", False),
])  # fmt: skip
def test_one_rank_with_zero_1_or_2_is_told_about_stage_0(tmp_path, caplog, world_size, config, hinted):
    from flexkd_ds.jobs.distill import student_ds_dict

    cfg = recipe_config(tmp_path, [f"deepspeed.student_config={config}"])
    env = DistEnv(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level("INFO", logger="flexkd_ds"):
        ds = student_ds_dict(cfg, env, tmp_path)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    assert ("student_zero0.json skips" in caplog.text) is hinted


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_its_package_stops_before_anything_is_written(tmp_path):
    result = run_job(DISTILL, tmp_path / "o", ["deepspeed.tensorboard=true"], nprocs=1, check=False)
    assert result.returncode != 0 and "pip install tensorboard" in result.output, result.tail()
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_every_logged_step_of_metrics_jsonl(tmp_path):
    """deepspeed.tensorboard=true: DeepSpeed's monitor writes train/<term> scalars at each step, with the
    values of metrics.jsonl (read back with TensorBoard's own event reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    run_job(DISTILL, out, ["train.max_steps=3", "importance.num_examples=8", "deepspeed.tensorboard=true"],
            nprocs=1)  # fmt: skip
    (events,) = (out / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    metrics = read_metrics(out)
    for term in ("loss", "lm", "logit", "feature"):
        scalars = acc.Scalars(f"train/{term}")
        assert [e.step for e in scalars] == [m["step"] for m in metrics]
        assert [e.value for e in scalars] == pytest.approx([m[term] for m in metrics], rel=1e-6)


def rank_streams(num_examples: int, seed: int, world_size: int) -> list[list[int]]:
    """Epoch 0 of each rank's example stream, written out from the sampler's documented rule: a
    ``random.Random(seed)`` shuffle, rank r taking positions r, r + world, ..."""
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    return [order[r::world_size] for r in range(world_size)]


def step_examples(cfg, world_size: int, step: int) -> list[list[list[int]]]:
    """[rank][micro-batch] -> example indices of optimizer step ``step`` (0-based): every micro-batch draws
    ``micro_batch_size`` indices from the rank's stream."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum
    streams = rank_streams(cfg.data.num_synthetic, cfg.seed, world_size)
    assert (step + 1) * per_step <= len(streams[0]), "the helper covers epoch 0 only"
    return [
        [stream[step * per_step + k * t.micro_batch_size : step * per_step + (k + 1) * t.micro_batch_size]
         for k in range(t.grad_accum)]
        for stream in streams
    ]  # fmt: skip


def top_k_lower_index(scores: torch.Tensor, k: int) -> list[int]:
    """Top-k units by score, ties broken by the lower index, in rank order (DESIGN.md "Selection")."""
    return sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))[:k]


def read_importance(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata())


def fresh_student_state(cfg) -> dict[str, torch.Tensor]:
    _, student, _ = model_specs(cfg)
    return {k: v.detach().clone() for k, v in student.load(torch.float32).state_dict().items()}


# ------------------------------------------------------------------------------ distill: artifacts + smoke

SMOKE_STEPS, SMOKE_LR = 8, 1e-3
SMOKE = [
    f"train.max_steps={SMOKE_STEPS}",
    f"train.lr={SMOKE_LR}",
    "importance.num_examples=8",
    "train.save_every=4",
]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """2 ranks, teacher ZeRO-3 + student ZeRO-2 (the recipe's configs), 8 steps."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    run_job(DISTILL, out, SMOKE, nprocs=2, timeout=JOB_TIMEOUT)
    return out


def check_distill_run(out: Path, overrides: list[str], world_size: int) -> None:
    """The DESIGN.md artifact contract of a finished distill run, each part checked independently."""
    cfg = recipe_config(out, overrides)
    t = cfg.train

    # config.resolved.yaml: reads back to the config the run was given.
    assert load_config(out / "config.resolved.yaml").to_dict() == cfg.to_dict()

    # metrics.jsonl: one line per step with the documented keys, finite values, a falling loss.
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, t.max_steps + 1))
    for m in metrics:
        assert set(METRIC_KEYS) <= set(m), f"missing keys {set(METRIC_KEYS) - set(m)}"
        assert all(finite(m[k]) for k in METRIC_KEYS), m
        assert m["tokens_per_s"] > 0 and m["teacher_ms"] > 0 and m["student_ms"] > 0
        assert m["step_ms"] >= m["teacher_ms"] + m["student_ms"] - 1e-6  # the whole step holds both parts
        assert 0 <= m["lr"] <= t.lr * (1 + 1e-9)
    stamps = [m["time"] for m in metrics]  # wall-clock seconds at each line, for plotting against time
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 3600
    # The lr a step used (not the next one): linear warm-up (step + 1) / warmup, then cosine to 0.
    for m in metrics:
        i = m["step"] - 1
        decay = (i - t.warmup_steps) / (t.max_steps - t.warmup_steps)
        multiplier = (i + 1) / t.warmup_steps if i < t.warmup_steps else (1 + math.cos(math.pi * decay)) / 2
        assert m["lr"] == pytest.approx(t.lr * multiplier, rel=1e-6), m
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, f"loss does not fall: {losses}"
    assert metrics[-1]["feature"] < metrics[0]["feature"], [m["feature"] for m in metrics]
    # The normaliser: valid (label) tokens of the global batch, all ranks and micro-batches, from the
    # sampler's rule written out here.
    dataset = tiny_dataset(cfg)
    for step, m in enumerate(metrics):
        examples = [i for rank in step_examples(cfg, world_size, step) for micro in rank for i in micro]
        expected = sum(sum(label != -100 for label in dataset[i]["labels"]) for i in examples)
        assert m["tokens"] == expected, f"step {step + 1}: {m['tokens']} tokens, expected {expected}"

    # importance.safetensors: the contract's tensors and metadata; the selection is the top-d_S of the scores.
    tensors, meta = read_importance(out / "importance.safetensors")
    assert set(tensors) == {"scores", "indices"}
    scores, indices = tensors["scores"], tensors["indices"]
    assert (scores.dtype, tuple(scores.shape), indices.dtype, tuple(indices.shape)) == (
        torch.float32, (D_T,), torch.int64, (D_S,))  # fmt: skip
    assert indices.tolist() == top_k_lower_index(scores, D_S)
    assert set(IMPORTANCE_METADATA) <= set(meta), f"missing metadata {set(IMPORTANCE_METADATA) - set(meta)}"
    assert all(isinstance(v, str) for v in meta.values())
    teacher, _, _ = model_specs(cfg)
    expected_meta = {"teacher": teacher.name, "layer": "last_hidden_state", "functional": "sum_logprobs",
                     "d_T": str(D_T), "d_S": str(D_S), "num_examples": str(cfg.importance.num_examples),
                     "dataset": "builtin:synthetic", "seed": str(cfg.seed)}  # fmt: skip
    assert {key: meta[key] for key in expected_meta} == expected_meta
    kept = set(indices.tolist())
    tail = sum(float(scores[i]) for i in range(D_T) if i not in kept) / float(scores.double().sum())
    assert float(meta["tail_mass"]) == pytest.approx(tail, abs=2e-6)
    assert meta["created_by"].startswith("flexkd_ds")

    # checkpoints/latest names the final, complete checkpoint.
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{t.max_steps:08d}" and (out / "checkpoints" / tag).is_dir()

    # student/: Hugging Face format + tokenizer; loads and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert model.config.hidden_size == D_S and len(tokenizer) == VOCAB
    prompt = tokenizer("Below is an instruction", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert generated.shape[1] > prompt["input_ids"].shape[1] and int(generated.max()) < VOCAB

    # The export is this run's student trained from its seeded init: every tensor moved, and by no more
    # than Adam can move it in these steps (|update| <= about 3.2 lr per step); a different init (another seed,
    # or an init that depends on the ZeRO stage) is ~0.1 away.
    exported, init = student_state(out), fresh_student_state(cfg)
    assert sorted(exported) == sorted(init)
    moved = {k: (exported[k] - init[k]).abs().max().item() for k in init}
    assert min(moved.values()) > 0, f"tensors not trained: {[k for k, v in moved.items() if v == 0]}"
    assert max(moved.values()) < 3.2 * t.max_steps * t.lr, (
        f"not the trained seeded init: {max(moved.values())}"
    )


def test_distill_two_ranks_zero2_end_to_end(zero2_run):
    check_distill_run(zero2_run, SMOKE, world_size=2)
    # save_every=4: an intermediate checkpoint, with every rank's state.
    assert (zero2_run / "checkpoints" / "step00000004" / "flexkd_rank1.pt").is_file()


@pytest.mark.slow
def test_distill_two_ranks_student_zero3_matches_zero2(tmp_path, zero2_run):
    """Student ZeRO-3 (partitioned parameters, gathered export): same artifacts, and the same training as
    ZeRO-2 up to float32 reduction order (same seed, data, teacher)."""
    out = tmp_path / "run"
    overrides = [*SMOKE, "deepspeed.student_config=ds_configs/student_zero3.json"]
    run_job(DISTILL, out, overrides, nprocs=2, timeout=JOB_TIMEOUT)
    check_distill_run(out, overrides, world_size=2)
    zero3_losses = [m["loss"] for m in read_metrics(out)]
    zero2_losses = [m["loss"] for m in read_metrics(zero2_run)]
    assert zero3_losses == pytest.approx(zero2_losses, rel=1e-5)
    assert_states_close(student_state(out), student_state(zero2_run), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    ["loss.fused_logits=false", "deepspeed.teacher_config=ds_configs/teacher_replicated.json"],
    ids=["whole-logits", "replicated-teacher"],
)
def test_distill_two_ranks_same_student_whole_logits_or_replicated_teacher(tmp_path, zero2_run, change):
    """The default run (chunked logit loss, ZeRO-3 teacher) against the same run with whole (B, T, V) logits,
    and against the teacher whole on every rank (stage 0): the same training up to float32 rounding."""
    out = tmp_path / "run"
    overrides = [*SMOKE, change]
    run_job(DISTILL, out, overrides, nprocs=2, timeout=JOB_TIMEOUT)
    check_distill_run(out, overrides, world_size=2)
    assert [m["loss"] for m in read_metrics(out)] == pytest.approx(
        [m["loss"] for m in read_metrics(zero2_run)], rel=1e-5
    )
    assert_states_close(student_state(out), student_state(zero2_run), atol=1e-5)


ACCUM = [*SMOKE, "train.grad_accum=2", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def accum_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("accum") / "run"
    run_job(DISTILL, out, ACCUM, nprocs=2, timeout=JOB_TIMEOUT)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fused", ["true", "false"])
def test_teacher_once_per_step_trains_the_same_student(tmp_path, accum_run, fused):
    """train.teacher_per_step: one live-teacher forward over both micro-batches of a step (padded to the
    longer) instead of one per micro-batch; the same training as the default up to float32 rounding, with
    the chunked logit loss and with whole logits (the teacher's held head forms them then)."""
    out = tmp_path / "run"
    overrides = [*ACCUM, "train.teacher_per_step=true", f"loss.fused_logits={fused}"]
    run_job(DISTILL, out, overrides, nprocs=2, timeout=JOB_TIMEOUT)
    assert [m["loss"] for m in read_metrics(out)] == pytest.approx(
        [m["loss"] for m in read_metrics(accum_run)], rel=1e-5
    )
    assert_states_close(student_state(out), student_state(accum_run), atol=1e-5)


# -------------------------------------------------------------------------------- importance over 2 ranks


@pytest.mark.slow
def test_score_two_ranks_equals_single_process_autograd(tmp_path):
    """launch/score.py on 2 ranks (11 examples: uneven shards, padded last batches) == per-example autograd
    through the teacher's head in one process, averaged over the same seeded subset."""
    out, num_examples = tmp_path / "score", 11
    overrides = [f"importance.num_examples={num_examples}", "importance.batch_size=4"]
    run_job(SCORE, out, overrides, nprocs=2, timeout=JOB_TIMEOUT)
    tensors, meta = read_importance(out / "importance.safetensors")

    cfg = recipe_config(out, overrides)
    teacher_spec, _, _ = model_specs(cfg)
    teacher = teacher_spec.load(torch.float32).eval()
    dataset = tiny_dataset(cfg)
    subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:num_examples]
    head = teacher.get_output_embeddings().weight.detach().double()  # (V, d_T), no bias in LLaMA
    per_example, num_tokens = [], 0
    for i in subset.tolist():
        input_ids = torch.tensor([dataset[i]["input_ids"]])  # one example, no padding: every token counts
        with torch.no_grad():
            out_t = teacher(input_ids=input_ids, output_hidden_states=True)
            hidden = teacher.model(input_ids=input_ids).last_hidden_state[0]  # (T, d_T) the head's input
        torch.testing.assert_close(hidden @ head.float().T, out_t.logits[0], rtol=1e-5, atol=1e-5)
        h = hidden.double().requires_grad_(True)
        functional = torch.log_softmax(h @ head.T, dim=-1).sum()  # F = sum_t sum_v log p_t,v
        (grad,) = torch.autograd.grad(functional, h)  # (T, d_T)
        per_example.append(grad.abs().mean(dim=0))
        num_tokens += input_ids.shape[1]
    expected = torch.stack(per_example).mean(dim=0)

    torch.testing.assert_close(tensors["scores"].double(), expected, rtol=1e-4, atol=1e-7)
    assert tensors["indices"].tolist() == top_k_lower_index(expected, D_S)
    assert (meta["num_examples"], meta["num_tokens"]) == (str(num_examples), str(num_tokens))


# ---------------------------------------------------------------------------------- global correlation scope

CORRELATION_WORKER = """
import sys
from pathlib import Path

import torch

from flexkd_ds.method import ops
from flexkd_ds.runtime.dist import all_reduce_sum, init_distributed

env = init_distributed()
inputs_path, results_dir = sys.argv[-2:]  # the launcher puts --local_rank=N first
inputs = torch.load(inputs_path)
rows = inputs["splits"][env.rank]  # this rank's examples (batch rows)
student = inputs["student"][rows].clone().requires_grad_(True)
loss = ops.correlation_loss(
    inputs["teacher"][rows], student, inputs["units"], inputs["mask"][rows], all_reduce=all_reduce_sum, impl="torch"
)
loss.backward()
torch.save({"loss": loss.detach(), "grad": student.grad}, Path(results_dir) / f"rank{env.rank}.pt")
"""


def reference_correlation_loss(teacher, student, units, mask):
    """Flex-KD loss written out in float64 (DESIGN.md step 3): valid rows, centred columns, cosine."""
    t = teacher.double()[mask][:, units]  # (N, d_S) the selected teacher columns
    s = student.double()[mask]  # (N, d_S)
    t, s = t - t.mean(0), s - s.mean(0)
    corr = (t * s).sum(0) / (t.norm(dim=0) * s.norm(dim=0))
    return ((1 - corr) ** 2).sum()


@pytest.mark.slow
def test_global_correlation_two_ranks_equals_single_process(tmp_path):
    """correlation_scope=global: on 2 ranks (uneven rows, masked tokens, a massive-activation column with
    |mean| 300) every rank gets the loss of the concatenated batch, and the ranks' gradient slices put
    together are the full single-process gradient."""
    gen = torch.Generator().manual_seed(0)
    batch, seq, units = 5, 7, torch.tensor([5, 0, 9, 3])
    teacher = torch.randn(batch, seq, 12, generator=gen)
    teacher[..., 9] = 300 + 0.5 * teacher[..., 9]  # large mean, small spread: needs a careful merge
    student = torch.randn(batch, seq, 4, generator=gen) + 0.3 * teacher[..., units]
    student[..., 1] += 40.0
    mask = torch.rand(batch, seq, generator=gen) > 0.25
    mask[4, :] = False  # an example without valid rows (on rank 1)
    splits = [[0, 1, 2], [3, 4]]
    torch.save({"teacher": teacher, "student": student, "units": units, "mask": mask, "splits": splits},
               tmp_path / "inputs.pt")  # fmt: skip
    worker = tmp_path / "worker.py"
    worker.write_text(CORRELATION_WORKER)
    results = tmp_path / "results"
    results.mkdir()
    cmd = job_command(str(worker), [str(tmp_path / "inputs.pt"), str(results)], nprocs=2)
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    student_leaf = student.double().requires_grad_(True)
    expected = reference_correlation_loss(teacher, student_leaf, units, mask)
    (expected_grad,) = torch.autograd.grad(expected, student_leaf)
    expected = float(expected.detach())
    ranks = [torch.load(results / f"rank{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        assert float(got["loss"]) == pytest.approx(expected, rel=1e-5), f"rank {r}"
    grad = torch.cat([got["grad"] for got in ranks]).double()  # rank slices in batch order
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()))
    # A control: the local (per-rank) loss is a different number here, so the check above has teeth.
    local = reference_correlation_loss(teacher[:3], student[:3], units, mask[:3])
    assert abs(float(local) - expected) > 1e-2


GLOBAL_VS_BIG_BATCH = ["train.max_steps=2", "train.lr_schedule=constant", "train.warmup_steps=0", "train.grad_clip=0",
                       "loss.alpha=1.0", "importance.num_examples=8"]  # fmt: skip


@pytest.mark.slow
def test_distill_global_scope_two_ranks_equals_one_rank_big_batch(tmp_path):
    """2 ranks x micro 2 with correlation_scope=global sees the same 4 examples per step as 1 process x
    micro 4 (rank r takes stream positions r, r + 2, ...); every term is then a function of the whole global
    batch, so both runs must make the same updates. (With the default local scope they differ: the
    correlation is taken per rank.)"""
    one, two = tmp_path / "one_rank", tmp_path / "two_ranks"
    run_job(DISTILL, one, [*GLOBAL_VS_BIG_BATCH, "train.micro_batch_size=4", "train.grad_accum=1"], nprocs=1,
            timeout=JOB_TIMEOUT)  # fmt: skip
    two.mkdir()
    (two / "importance.safetensors").write_bytes((one / "importance.safetensors").read_bytes())  # same units
    run_job(DISTILL, two, [*GLOBAL_VS_BIG_BATCH, "train.micro_batch_size=2", "train.grad_accum=1",
                           "loss.correlation_scope=global"], nprocs=2, timeout=JOB_TIMEOUT)  # fmt: skip
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "lm", "logit", "feature"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    assert_states_close(student_state(two), student_state(one), atol=1e-5)


# -------------------------------------------------------------------------------- accumulation invariance

ACCUMULATION = ["train.max_steps=2", "train.lr_schedule=constant", "train.warmup_steps=0", "train.grad_clip=0",
                "importance.num_examples=8"]  # fmt: skip


@pytest.mark.slow
def test_accumulation_invariance_token_terms(tmp_path):
    """micro 2 x accumulation 2 makes the same updates as micro 4 x accumulation 1 for token-decomposable
    terms (LM + logit KD + the projector baseline): each is a sum over valid tokens divided by the token count
    of the whole step. The sampler draws micro_batch_size indices per micro-batch from one stream, so both
    see the same 4 examples per step.

    flexkd and cka are batch statistics (a correlation over the rows of one micro-batch is not a sum over
    tokens), so by design (objective.py) they are averaged over micro-batches and are NOT invariant to the
    split; ``test_one_step_matches_reference_update`` checks what accumulation gives for them instead."""
    split, whole = tmp_path / "micro2_accum2", tmp_path / "micro4_accum1"
    common = [*ACCUMULATION, "loss.feature_loss=projector", "loss.alpha=0.5"]
    run_job(
        DISTILL,
        split,
        [*common, "train.micro_batch_size=2", "train.grad_accum=2"],
        nprocs=1,
        timeout=JOB_TIMEOUT,
    )
    run_job(
        DISTILL,
        whole,
        [*common, "train.micro_batch_size=4", "train.grad_accum=1"],
        nprocs=1,
        timeout=JOB_TIMEOUT,
    )
    for a, b in zip(read_metrics(split), read_metrics(whole), strict=True):
        for key in ("loss", "lm", "logit", "feature"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert_states_close(student_state(split), student_state(whole), atol=1e-5)
    from safetensors.torch import load_file

    assert_states_close(
        load_file(split / "projector.safetensors"), load_file(whole / "projector.safetensors"), atol=1e-5
    )


ONE_STEP_LR, ONE_STEP_EPS = 1e-2, 1e-3
ONE_STEP = ["train.max_steps=1", "train.micro_batch_size=2", "train.grad_accum=2", "train.lr_schedule=constant",
            "train.warmup_steps=0", "train.grad_clip=0", f"train.lr={ONE_STEP_LR}", f"train.adam_eps={ONE_STEP_EPS}",
            "importance.num_examples=8", "loss.alpha=0.5"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fused", ["true", "false"])
def test_one_step_matches_reference_update(tmp_path, fused):
    """One optimizer step (micro 2 x accumulation 2, flexkd + rkl + LM) == the step computed here from the
    objective written out: token terms summed over the step's valid tokens / their count, the correlation
    averaged over the two micro-batches, one AdamW step from the seeded init. (adam_eps is raised so Adam's
    first step, g / (|g| + eps), follows the gradient smoothly instead of its sign, which float32 noise
    could flip where g ~ 0. train.grad_clip=0 must mean no clipping: DeepSpeed clips at 1.0 when the key is
    absent.) Both logit paths: chunked (loss.fused_logits, the default) and whole logits. The tolerance:
    Adam's first update lr * g / (|g| + eps) moves by up to lr / eps = 10 per unit of gradient error, and
    float32 gradients differ from float64 by a few 1e-7 (1.9e-6 and 2.2e-6 measured, whole and chunked)."""
    out = tmp_path / "run"
    overrides = [*ONE_STEP, f"loss.fused_logits={fused}"]
    run_job(DISTILL, out, overrides, nprocs=1, timeout=JOB_TIMEOUT)
    cfg = recipe_config(out, overrides)
    teacher_spec, student_spec, tokenizer = model_specs(cfg)
    teacher = teacher_spec.load(torch.float32).double().eval()
    student = student_spec.load(torch.float32).double().train()
    init = {k: v.detach().clone() for k, v in student.state_dict().items()}
    tensors, _ = read_importance(out / "importance.safetensors")
    units = tensors["indices"]
    dataset = tiny_dataset(cfg)
    pad_id = tokenizer.pad_token_id

    micro_batches = [
        data.collate([dataset[i] for i in micro], pad_id) for micro in step_examples(cfg, 1, 0)[0]
    ]
    num_tokens = sum(int(b["loss_mask"].sum()) for b in micro_batches)
    w = cfg.loss
    objective = 0.0
    for b in micro_batches:
        with torch.no_grad():
            t_out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            t_hidden = teacher.model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            ).last_hidden_state
        s_hidden = student.model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        ).last_hidden_state
        s_logits = student.lm_head(s_hidden)
        valid = b["loss_mask"]
        log_q = torch.log_softmax(s_logits[valid], -1)  # student (N, V)
        log_p = torch.log_softmax(t_out.logits[valid], -1)  # teacher
        rkl_sum = (log_q.exp() * (log_q - log_p)).sum()  # KL(q || p) summed over tokens
        lm_sum = -log_q.gather(1, b["labels"][valid][:, None]).sum()
        corr = reference_correlation_loss(t_hidden, s_hidden, units, b["attention_mask"].bool())
        objective = objective + (w.lm_weight * lm_sum + w.beta * rkl_sum) / num_tokens + w.alpha * corr / 2
    objective.backward()
    optimizer = torch.optim.AdamW(student.parameters(), lr=ONE_STEP_LR, eps=ONE_STEP_EPS, weight_decay=0.0)
    optimizer.step()
    expected = {k: v.detach().float() for k, v in student.state_dict().items()}

    exported = student_state(out)
    assert_states_close(exported, expected, atol=4e-6)
    # Not trivially so: the step moved the weights by far more than the tolerance.
    assert max((exported[k].double() - init[k]).abs().max().item() for k in init) > 100 * 4e-6
    logged = read_metrics(out)[0]
    assert logged["tokens"] == num_tokens
    assert logged["loss"] == pytest.approx(float(objective.detach()), rel=1e-5)


# ------------------------------------------------------------------------------------------------- resume

RESUME = ["train.max_steps=10", "train.lr_schedule=constant", "train.warmup_steps=4", "train.save_every=0",
          "importance.num_examples=8"]  # fmt: skip
# Constant after warm-up: a cosine schedule depends on max_steps, so "4 steps, then extend to 10" would be
# another schedule than "10 steps". Resuming at step 4 or earlier still needs the restored LR-scheduler state.


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    run_job(DISTILL, out, RESUME, nprocs=2, timeout=JOB_TIMEOUT)
    return out


def check_same_as_straight(out: Path, straight: Path) -> None:
    metrics, reference = read_metrics(out), read_metrics(straight)
    assert [m["step"] for m in metrics] == list(range(1, 11)), "each step logged once, across the restart"
    for a, b in zip(metrics, reference, strict=True):
        assert a["tokens"] == b["tokens"], f"step {a['step']}: other examples than the straight run"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), f"step {a['step']}"
    assert_states_close(student_state(out), student_state(straight), atol=1e-5)


@pytest.mark.slow
def test_resume_after_max_steps_matches_straight_run(tmp_path, straight_run):
    """4 steps, then the same output_dir with max_steps=10 (resume=auto) == 10 steps straight."""
    out = tmp_path / "run"
    run_job(DISTILL, out, [*RESUME, "train.max_steps=4"], nprocs=2, timeout=JOB_TIMEOUT)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    resumed = run_job(DISTILL, out, RESUME, nprocs=2, timeout=JOB_TIMEOUT)
    assert "reusing importance file" in resumed.output and "resumed from" in resumed.output
    check_same_as_straight(out, straight_run)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path, straight_run):
    """SIGTERM to ONE rank mid-run (as a preempting scheduler's signal may reach ranks at different times):
    the ranks agree at the next step boundary, checkpoint, and the whole job exits 0; resume=auto then
    continues to the end with the same examples and the same final weights as a straight run."""
    import psutil

    out = tmp_path / "run"
    job = start_job(DISTILL, out, RESUME, nprocs=2)
    try:
        deadline, rank1 = time.monotonic() + JOB_TIMEOUT, None
        while time.monotonic() < deadline and job.proc.poll() is None:
            log = out / "metrics.jsonl"
            steps = log.read_text().count("\n") if log.is_file() else 0  # complete lines only
            if steps >= 2:
                for proc in psutil.Process(job.proc.pid).children(recursive=True):
                    try:
                        cmdline = proc.cmdline()
                    except psutil.Error:  # a short-lived helper process
                        continue
                    if DISTILL in cmdline and "--local_rank=1" in cmdline:
                        rank1 = proc
                if rank1 is not None:
                    rank1.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        result = job.wait(JOB_TIMEOUT)
    finally:
        kill_tree(job.proc.pid)
    assert rank1 is not None, f"no rank 1 process found at step 2:\n{result.tail()}"
    assert result.returncode == 0, result.tail()
    assert "preemption signal: checkpointing at step" in result.output, result.tail()
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.removeprefix("step"))
    assert 2 <= stopped < 10, (
        f"checkpoint {tag}: the run ended before the signal was handled\n{result.tail()}"
    )
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped + 1))

    resumed = run_job(DISTILL, out, RESUME, nprocs=2, timeout=JOB_TIMEOUT)
    assert f"at step {stopped}" in resumed.output
    check_same_as_straight(out, straight_run)


@pytest.mark.slow
def test_killing_only_the_deepspeed_runner_stops_every_rank_with_a_checkpoint(tmp_path):
    """`kill <pid>` of the `deepspeed` command (SIGTERM to the runner alone, as a person does): the ranks
    notice their launcher is gone, checkpoint at the next step boundary and exit within 60 s (they used to
    train on to the end, unseen); the rerun resumes from that checkpoint (a long run, so that it is still
    training when the runner goes; resume exactness is tested above)."""
    import psutil

    out = tmp_path / "run"
    long_run = [*RESUME, "train.max_steps=2000"]
    job = start_job(DISTILL, out, long_run, nprocs=2)

    def ranks():
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if DISTILL in cmdline and f"output_dir={out}" in cmdline and "--local_rank" in cmdline:
                found.append(proc)
        return found

    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        log = out / "metrics.jsonl"
        while time.monotonic() < deadline and (not log.is_file() or log.read_text().count("\n") < 2):
            time.sleep(0.05)
        assert len(ranks()) == 2, "the ranks were not found"
        job.proc.send_signal(signal.SIGTERM)  # the runner only
        killed_at = time.monotonic()
        while ranks() and time.monotonic() - killed_at < 60:
            time.sleep(0.5)
        left = ranks()
    finally:
        kill_tree(job.proc.pid)
        for proc in ranks():
            proc.kill()
    assert not left, f"ranks still running 60 s after the runner was killed: {[p.pid for p in left]}"
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / tag / "flexkd_complete.json").is_file()
    stopped = int(tag.removeprefix("step"))
    assert 2 <= stopped < 2000, f"checkpoint {tag}: the run ended before the runner was killed"
    resumed = run_job(
        DISTILL, out, [*RESUME, f"train.max_steps={stopped + 2}"], nprocs=2, timeout=JOB_TIMEOUT
    )
    assert f"at step {stopped}" in resumed.output
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped + 3))


SAVING = [*RESUME, "train.save_every=2"]  # checkpoints at steps 2, 4, ...; the straight run's training


def rank1_optimizer_file(tag_dir: Path) -> Path:
    found = sorted(tag_dir.glob("*pp_rank_1_*optim_states.pt"))
    assert found, f"no rank-1 optimizer file in {sorted(p.name for p in tag_dir.iterdir())}"
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_optimizer_file", "empty_latest"])
def test_a_damaged_checkpoint_is_not_used_and_the_run_ends_as_a_straight_one(tmp_path, straight_run, damage):
    """The newest checkpoint with one rank's optimizer file truncated is named and skipped (resume from the
    previous complete one); an empty ``latest`` is ignored (resume from the newest complete checkpoint).
    Either way the run ends with the straight run's losses and weights."""
    out = tmp_path / "run"
    run_job(DISTILL, out, [*SAVING, "train.max_steps=4"], nprocs=2, timeout=JOB_TIMEOUT)
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000002", "step00000004"]
    if damage == "truncated_optimizer_file":
        victim = rank1_optimizer_file(ckpt / "step00000004")
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        expected = "step00000002"
    else:
        (ckpt / "latest").write_text("")
        expected = "step00000004"
    resumed = run_job(DISTILL, out, SAVING, nprocs=2, timeout=JOB_TIMEOUT)
    assert f"resumed from {ckpt / expected}" in resumed.output, resumed.tail()
    if damage == "truncated_optimizer_file":
        assert f"step00000004: {victim} has" in resumed.output and "falling back" in resumed.output
    check_same_as_straight(out, straight_run)


@pytest.mark.slow
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_in_charge(tmp_path, straight_run):
    """SIGKILL of rank 1 while the step-4 checkpoint is being written (each save held open 4 s): no
    completion marker, ``latest`` still names step 2; the rerun says so, resumes from step 2 and ends as
    the straight run."""
    import psutil

    out = tmp_path / "run"
    job = start_job(DISTILL, out, SAVING, nprocs=2, env={"FLEXKD_CHECKPOINT_SAVE_DELAY_S": "4"})
    tag4, killed = out / "checkpoints" / "step00000004", False
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline and job.proc.poll() is None and not killed:
            if tag4.is_dir() and list(tag4.glob("*pp_rank_1_*optim_states.pt")):  # DeepSpeed has written
                for proc in psutil.Process(job.proc.pid).children(recursive=True):
                    try:
                        if DISTILL in proc.cmdline() and "--local_rank=1" in proc.cmdline():
                            proc.kill()
                            killed = True
                    except psutil.Error:
                        continue
            time.sleep(0.05)
        result = job.wait(JOB_TIMEOUT)
    finally:
        kill_tree(job.proc.pid)
    assert killed and result.returncode != 0, result.tail()
    assert not (tag4 / "flexkd_complete.json").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = run_job(DISTILL, out, SAVING, nprocs=2, timeout=JOB_TIMEOUT)
    assert "step00000004:" in resumed.output and "its save did not finish" in resumed.output, resumed.tail()
    assert f"resumed from {out / 'checkpoints' / 'step00000002'}" in resumed.output
    check_same_as_straight(out, straight_run)


@pytest.mark.slow
def test_a_signal_during_the_importance_pass_stops_cleanly_and_the_rerun_continues(tmp_path):
    """SIGTERM reaches rank 1 before its 4th of 8 scoring batches (it sends it to itself through the real
    handler): both ranks stop at that batch, save their partial sums and exit 0 (the handler used to be
    installed only for training, so the rank died); the rerun continues at batch 3 and writes the importance
    file an uninterrupted pass writes."""
    args = ["train.max_steps=1", "importance.num_examples=64", "importance.batch_size=4"]
    run_job(DISTILL, tmp_path / "whole", args, nprocs=2, timeout=JOB_TIMEOUT)
    out = tmp_path / "run"
    stopped = run_job(DISTILL, out, args, nprocs=2, timeout=JOB_TIMEOUT,
                      env={"FLEXKD_SCORE_SIGNAL_AT_BATCH": "3"})  # fmt: skip
    assert "the importance pass stopped after 3 of 8 batches" in stopped.output, stopped.tail()
    assert not (out / "importance.safetensors").exists() and not (out / "student").exists()
    assert sorted(p.name for p in (out / "importance.partial").iterdir()) == ["rank0.pt", "rank1.pt"]
    rerun = run_job(DISTILL, out, args, nprocs=2, timeout=JOB_TIMEOUT)
    assert "resuming a stopped pass at batch 3" in rerun.output, rerun.tail()
    resumed, whole = (read_importance(d / "importance.safetensors")[0] for d in (out, tmp_path / "whole"))
    assert torch.equal(resumed["scores"], whole["scores"]) and torch.equal(
        resumed["indices"], whole["indices"]
    )
    assert not (out / "importance.partial").exists()


# ---------------------------------------------------------------------------------------------- bad inputs

FOREIGN_TEACHER = (
    "random:family=llama,hidden_size=64,num_heads=4,num_key_value_heads=2,num_layers=4,vocab_size=259"
)


def test_bad_inputs_fail_clearly_and_keep_existing_files(tmp_path):
    """Single-process runs on bad inputs (started together to save time) exit non-zero with a message that
    names the problem, and leave what the output dir already held byte for byte as it was."""
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say bye."},  # row 2: no output
        {"instruction": "Count.", "output": "1 2 3"},
    ]) + "\n")  # fmt: skip
    missing = tmp_path / "nowhere" / "train.jsonl"
    cases = {  # name -> (overrides, strings the output must contain)
        "student_as_wide": (["model.student_arch.hidden_size=64"], ["d_S=64", "d_T=64"]),
        "student_wider": (["model.student_arch.hidden_size=128"], ["d_S=128", "d_T=64"]),
        "foreign_importance": ([], ["importance.safetensors", "teacher", "num_layers=4", "importance.recompute"]),
        "missing_data": ([f"data.train={missing}"], [str(missing)]),
        "row_without_output": ([f"data.train={bad_rows}"], [str(bad_rows), "row 2", "'output'"]),
        "bad_valid_rows": ([f"data.valid={bad_rows}", "train.eval_every=1"], [str(bad_rows), "row 2", "'output'"]),
        "vocab_mismatch": (["model.student_arch.vocab_size=300"], ["vocab sizes differ", "teacher 259", "student 300"]),
    }  # fmt: skip
    jobs, before = {}, {}
    for name, (overrides, _) in cases.items():
        out = tmp_path / name
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a previous run's files
        (out / "config.resolved.yaml").write_text("# the previous run's config\n")
        if name == "foreign_importance":
            importance.save_importance(
                out / "importance.safetensors",
                torch.linspace(1.0, 2.0, D_T),
                torch.arange(D_T - 1, D_T - 1 - D_S, -1),
                {"teacher": FOREIGN_TEACHER, "layer": "last_hidden_state", "functional": "sum_logprobs",
                 "num_examples": 8, "num_tokens": 100, "tail_mass": 0.4, "dataset": "builtin:synthetic", "seed": 1},
            )  # fmt: skip
        before[name] = {p.name: p.read_bytes() for p in out.iterdir()}
        jobs[name] = start_job(
            DISTILL, out, ["train.max_steps=1", "importance.num_examples=4", *overrides], nprocs=1
        )
    failures = []
    for name, job in jobs.items():
        result = job.wait(JOB_TIMEOUT)
        out, (overrides, needles) = tmp_path / name, cases[name]
        if "EADDRINUSE" in result.output:  # concurrent launches raced for a free port: run this one again
            args = ["train.max_steps=1", "importance.num_examples=4", *overrides]
            result = start_job(DISTILL, out, args, nprocs=1).wait(JOB_TIMEOUT)
        problems = [f"exit {result.returncode}"] if result.returncode == 0 else []
        problems += [f"no {needle!r} in the output" for needle in needles if needle not in result.output]
        problems += [
            f"{f} changed" for f, content in before[name].items() if (out / f).read_bytes() != content
        ]
        problems += ["training started"] if (out / "checkpoints").exists() else []
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n{result.tail(2500)}")
    assert not failures, "\n\n".join(failures)


def test_own_data_holds_out_a_validation_slice_by_default(tmp_path):
    """data.train = one's own file, no data.valid: 64 of its 700 rows are held out (the teacher cache, which
    indexes what is trained on, holds 636 examples) and the run ends with their NLL before and after."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Count to {i % 9 + 1}.", "output": " ".join(
        str(k) for k in range(1, i % 9 + 2))}) + "\n" for i in range(700)))  # fmt: skip
    out = tmp_path / "o"
    result = run_job(DISTILL, out, [f"data.train={rows}", "train.max_steps=1", "importance.num_examples=8",
                                    f"teacher_cache.dir={tmp_path / 'cache'}"], nprocs=1)  # fmt: skip
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_examples"] == 636
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["rows"] == 64 and heldout["student_end"] < heldout["student_start"] + 1.0
    assert "64 of 700 rows" in result.output and "never trained on" in result.output


def test_save_best_keeps_the_student_of_the_lowest_validation_nll(tmp_path):
    """train.save_best: student-best/ holds the weights of the evaluation with the lowest validation NLL, and
    best.json says which; the NLL of those weights, recomputed here with the plain model and cross-entropy
    written out in float64, is the one the run logged at that step. A high lr makes the curve turn up."""
    from transformers import AutoModelForCausalLM

    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": " ".join(w)}) + "\n"
                             for w in ("cat", "house", "tree", "river", "light", "stone")))  # fmt: skip
    out = tmp_path / "o"
    overrides = [f"data.valid={valid}", "train.save_best=true", "train.eval_every=2", "train.max_steps=12",
                 "train.lr=0.03", "train.warmup_steps=0", "train.lr_schedule=constant"]  # fmt: skip
    result = run_job(DISTILL, out, overrides, nprocs=1)
    curve = [(r["step"], r["valid_lm"]) for r in read_metrics(out) if "valid_lm" in r]
    assert [s for s, _ in curve] == [2, 4, 6, 8, 10, 12]
    best_step, best_nll = min(curve, key=lambda c: c[1])
    saved = json.loads((out / "student-best" / "best.json").read_text())
    assert saved == {"step": best_step, "valid_lm": best_nll}
    assert f"at step {best_step}" in result.output
    assert not (out / "student-best.tmp").exists()

    cfg = recipe_config(out, [f"data.valid={valid}"])
    _, _, tokenizer = model_specs(cfg)
    rows = train_dataset(cfg, tokenizer, CPU, valid=True)
    model = AutoModelForCausalLM.from_pretrained(out / "student-best", torch_dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in rows:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            counted = labels != -100
            total -= float(logp[counted.nonzero().flatten(), labels[counted]].sum())
            count += int(counted.sum())
    assert math.isclose(total / count, best_nll, rel_tol=2e-4), (total / count, best_nll)
    if best_step != 12:  # the last step's student is another one
        last = AutoModelForCausalLM.from_pretrained(out / "student", torch_dtype=torch.float64)
        assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values(), strict=True))


def test_save_best_needs_a_validation_set(tmp_path):
    with pytest.raises(Exception, match="train.save_best"):
        recipe_config(tmp_path, ["train.save_best=true"])


def test_a_resumed_run_keeps_only_a_best_it_has_already_passed(tmp_path):
    from flexkd_ds.jobs.distill import BEST_DIR, BestStudent

    (tmp_path / BEST_DIR).mkdir()
    (tmp_path / BEST_DIR / "best.json").write_text(json.dumps({"step": 6, "valid_lm": 3.1}))
    kept = BestStudent(tmp_path, start_step=8)
    assert (kept.step, kept.valid_lm) == (6, 3.1)
    for start in (0, 4):  # a fresh run, or a best on the stretch trained again: found again on the way
        fresh = BestStudent(tmp_path, start_step=start)
        assert (fresh.step, fresh.valid_lm) == (None, math.inf)


def test_the_training_step_checks_the_unit_selection_once_not_every_micro_batch(tmp_path):
    """distill checks the fixed Flex-KD selection once (range, duplicates); the step must then tell the loss so
    (``units_checked``), or every micro-batch repeats the check: host syncs on a GPU. It used not to: 2 steps
    x 2 micro-batches re-ran it 4 times. Counted by wrapping the loss module's check in a one-rank run
    (the wrapper is installed before distill imports the check, so distill's own call counts too)."""
    count_file = tmp_path / "calls.txt"
    runner = tmp_path / "run_counting.py"
    runner.write_text(
        "import atexit, runpy, sys\n"
        "from flexkd_ds.method import losses\n"
        "calls = []\n"
        "real = losses.check_unit_indices\n"
        "def counting(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    return real(*args, **kwargs)\n"
        "losses.check_unit_indices = counting\n"
        f"atexit.register(lambda: open({str(count_file)!r}, 'w').write(str(len(calls))))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = tmp_path / "run"
    cmd = [sys.executable, str(runner), DISTILL, "--config", str(RECIPE), f"output_dir={out}", "train.max_steps=2",
           "importance.num_examples=8", "train.grad_accum=2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and all(finite(m["feature"]) for m in read_metrics(out))
    assert count_file.read_text() == "1"  # distill's own check (it imports the wrapped one); without the fix 5
