"""Side by side with the peers: one distillation run through flexkd-ds, TRL and torchtune (issue 20).

    python bench/peers.py --quick        # tiny random LLaMA pair, byte tokenizer: a few minutes on 2 CPU cores
    python bench/peers.py                # SmolLM2-135M-Instruct teacher, random narrow LLaMA student (full)

What is held equal: the teacher and the student (the same Hugging Face checkpoints, written once by
``prepare``), the token ids of every example (``flexkd_ds.inputs.data.InstructionDataset`` tokenises them for
all three), the order of the examples (flexkd-ds's seeded sampler; the peers get the rows in that order with
shuffling off), batch, sequence length (every example is exactly ``max_length`` tokens, so no step pads),
AdamW (lr, betas, eps, no weight decay, constant lr, no warm-up, no gradient clipping), fp32, steps, and one
thread per process. What each framework runs:

- ``flexkd-*``: the product, ``deepspeed --num_gpus 1 launch/distill.py`` with key=value overrides (student
  ZeRO-2 as shipped, the teacher replicated: ``ds_configs/teacher_replicated.json``), no validation;
- ``trl-gkd-rkl``: ``trl.experimental.gkd.GKDTrainer`` with lmbda = 0 (off-policy, the dataset's responses)
  and beta = 1 (its reverse-KL endpoint), a collator that stacks our token ids;
- ``tt-*``: torchtune's ``knowledge_distillation_single_device`` recipe (its own class, our config), with the
  checkpoints read by its ``FullModelHFCheckpointer``. That recipe trains LoRA adapters only: its rows are the
  same data and objective with a different trainable set.

Step time is the wall time between consecutive step ends (flexkd-ds: new lines of ``metrics.jsonl`` seen by a
poller in the harness; TRL: ``on_step_end``; torchtune: its metric logger, called right after each step), the
first ``warmup`` steps dropped. Peak memory is the peak RSS of the training process (its VmHWM). The
held-out numbers come from ``heldout_metrics`` on every saved student. Each process is started one after the
other, frameworks interleaved for ``--rounds`` rounds; docs/benchmarks.md has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruct"
QUICK = dict(steps=30, warmup=3, batch=4, max_length=256, lr=1e-3, heldout_rows=32, lora_rank=8)
FULL = dict(steps=12, warmup=2, batch=4, max_length=128, lr=1e-4, heldout_rows=32, lora_rank=16)
FLEXKD = {  # variant -> loss overrides of launch/distill.py
    "flexkd-rkl": ["loss.feature_loss=none", "loss.logit_loss=rkl"],
    "flexkd-flexkd+rkl": ["loss.feature_loss=flexkd", "loss.alpha=0.05", "loss.logit_loss=rkl"],
    "flexkd-fkl": ["loss.feature_loss=none", "loss.logit_loss=fkl"],
}
VARIANTS = ["flexkd-rkl", "trl-gkd-rkl", "tt-rkl", "flexkd-fkl", "tt-fkl", "flexkd-flexkd+rkl"]
SAME_OBJECTIVE = {"trl-gkd-rkl": "flexkd-rkl", "tt-rkl": "flexkd-rkl", "tt-fkl": "flexkd-fkl"}


# --------------------------------------------------------------------------------------- shared held-out
def heldout_metrics(student, teacher, batches) -> dict:
    """Mean response NLL of ``student`` and mean per-token reverse KL(q_S || p_T) to ``teacher``.

    ``student`` / ``teacher``: callables ``(input_ids, attention_mask) -> logits (B, T, V)``. ``batches``: dicts
    of ``input_ids``, ``attention_mask`` and ``labels`` (B, T), labels already shifted (``labels[t]`` is the token
    after t, -100 where no loss). Logits are upcast to float64; no framework loss code.
    """
    nll = rkl = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            mask = batch["labels"] != -100  # (B, T)
            log_q = (
                student(batch["input_ids"], batch["attention_mask"])[mask].double().log_softmax(-1)
            )  # (N, V)
            log_p = teacher(batch["input_ids"], batch["attention_mask"])[mask].double().log_softmax(-1)
            targets = batch["labels"][mask]  # (N,)
            nll -= float(log_q.gather(1, targets[:, None]).sum())
            rkl += float((log_q.exp() * (log_q - log_p)).sum())
            tokens += int(mask.sum())
    return {"nll": nll / tokens, "rkl": rkl / tokens, "tokens": tokens}


def logits_of(model):
    return lambda ids, attn: model(input_ids=ids, attention_mask=attn).logits


# --------------------------------------------------------------------------------------------- the data
def encoded_rows(path: Path, tokenizer, max_length: int, count: int, skip: int = 0) -> tuple[list, list]:
    """The first ``count`` rows of ``path`` (after ``skip``) at least ``max_length`` tokens long, and their
    encodings cut to exactly ``max_length`` by the product's ``InstructionDataset``."""
    from flexkd_ds.inputs.data import InstructionDataset

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][skip:]
    full = InstructionDataset(records, tokenizer, max_length=1 << 20, show_progress=False)
    keep = [r for i, r in enumerate(records) if len(full[i]["input_ids"]) >= max_length][:count]
    if len(keep) < count:
        raise SystemExit(f"{path}: only {len(keep)} rows reach {max_length} tokens; need {count}")
    cut = InstructionDataset(keep, tokenizer, max_length=max_length, show_progress=False)
    return keep, [cut[i] for i in range(len(keep))]


def batch_of(examples: list[dict]) -> dict:
    """Stack equal-length encodings: ``labels`` shifted (flexkd-ds), ``unshifted`` (HF / torchtune)."""
    ids = torch.tensor([ex["input_ids"] for ex in examples])
    labels = torch.tensor([ex["labels"] for ex in examples])
    unshifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "unshifted": unshifted,
    }


def training_order(num_rows: int, steps: int, batch: int, seed: int) -> list[int]:
    """The row indices flexkd-ds's sampler draws on one rank, step after step."""
    from flexkd_ds.runtime.sampling import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(num_rows, rank=0, world_size=1, seed=seed)
    return sampler.next_indices(steps * batch)


def model_configs(quick: bool):
    """(teacher config or None for SmolLM2, student config); LLaMA with tied heads, head_dim = hidden / heads
    (what torchtune's llama3_2 builder assumes)."""
    from transformers import LlamaConfig

    def llama(hidden, layers, heads, kv, inter, vocab, theta, eps):
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                           max_position_embeddings=2048, rope_theta=theta, rms_norm_eps=eps,
                           tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip

    if quick:
        return llama(128, 4, 4, 2, 344, 259, 10000.0, 1e-5), llama(64, 2, 4, 2, 172, 259, 10000.0, 1e-5)
    return None, llama(288, 8, 9, 3, 768, 49152, 100000.0, 1e-5)


def prepare(work: Path, quick: bool, seed: int) -> dict:
    """Teacher and student checkpoints, the training file, the token rows in training order, the held-out rows."""
    from flexkd_ds.inputs.models import build_causal_lm_from_config

    shape = QUICK if quick else FULL
    spec_path = work / "spec.json"
    if spec_path.exists():
        return json.loads(spec_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    teacher_cfg, student_cfg = model_configs(quick)
    if quick:
        from flexkd_ds.inputs.byte_tokenizer import byte_tokenizer

        tokenizer = byte_tokenizer()
        teacher = build_causal_lm_from_config(teacher_cfg, seed=seed)
    else:  # the quickstart's teacher, de-quantised once and written as an fp32 HF checkpoint
        from flexkd_ds.inputs.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m-instruct")
        gguf = load_causal_lm("smollm2-135m-instruct")  # flagged as quantized: copy into a plain model
        config = gguf.config
        config.__dict__.pop("quantization_config", None)
        teacher = build_causal_lm_from_config(config, seed=seed)
        teacher.load_state_dict(gguf.state_dict())
    for name, model in (
        ("teacher", teacher),
        ("student", build_causal_lm_from_config(student_cfg, seed=seed + 1)),
    ):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, key, getattr(tokenizer, key))
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    count = shape["steps"] * shape["batch"]
    rows, encoded = encoded_rows(DATA / "dolly_dev.jsonl", tokenizer, shape["max_length"], count)
    with open(work / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    order = training_order(len(rows), shape["steps"], shape["batch"], seed)
    (work / "train_tokens.json").write_text(json.dumps([encoded[i] for i in order]))
    _, held = encoded_rows(DATA / "dolly_valid.jsonl", tokenizer, shape["max_length"], shape["heldout_rows"])
    (work / "heldout_tokens.json").write_text(json.dumps(held))
    spec = {"quick": quick, "seed": seed, **shape, "pad_id": tokenizer.pad_token_id,
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "vocab": student_cfg.vocab_size,
            "teacher_config": teacher.config.to_dict(), "student_config": student_cfg.to_dict()}  # fmt: skip
    spec_path.write_text(json.dumps(spec, indent=1))
    return spec


# ---------------------------------------------------------------------------------------- the workers
def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Intervals between consecutive step ends, without the first ``warmup`` steps (at least the first)."""
    w = max(warmup, 1)
    return [b - a for a, b in zip(stamps[w - 1 : -1], stamps[w:], strict=True)]


def run_flexkd(variant: str, work: Path, out: Path, spec: dict, port: int) -> dict:
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(port), "launch/distill.py",
           f"output_dir={out}", f"seed={spec['seed']}", f"model.teacher={work / 'teacher'}",
           f"model.student={work / 'student'}", "model.student_init=pretrained", "model.dtype=fp32",
           f"data.train={work / 'train.jsonl'}", "data.responses=dataset", "data.valid=null",
           f"data.max_length={spec['max_length']}", "loss.beta=1.0", "loss.lm_weight=0.0",
           f"train.max_steps={spec['steps']}", f"train.micro_batch_size={spec['batch']}", "train.grad_accum=1",
           f"train.lr={spec['lr']}", "train.lr_schedule=constant", "train.warmup_steps=0", "train.grad_clip=0.0",
           "train.weight_decay=0.0", "importance.num_examples=16",
           "deepspeed.teacher_config=ds_configs/teacher_replicated.json", *FLEXKD[variant]]  # fmt: skip
    metrics, stamps, done, peak = out / "metrics.jsonl", [], threading.Event(), {}

    def watch(launcher: int) -> None:  # a step ends when its metrics line is flushed
        seen, last_sample = 0, 0.0
        while not done.is_set():
            n = metrics.read_text().count("\n") if metrics.exists() else 0
            now = time.perf_counter()
            stamps.extend([now] * (n - seen))
            seen = n
            if now - last_sample > 0.5:  # the rank's own high-water mark (not the launcher's, not a helper's)
                last_sample = now
                peak.update(rank_hwm_mb(launcher, list(peak)))
            time.sleep(0.002)

    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=watch, args=(proc.pid,), daemon=True)
        watcher.start()
        rc = proc.wait()
    done.set()
    watcher.join()
    if rc != 0:
        raise SystemExit(f"{variant}: launch/distill.py exited {rc}; see {out.parent / (out.name + '.log')}")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    own = [(x["teacher_ms"] + x["student_ms"]) / 1000 for x in lines[spec["warmup"] :]]
    return {"stamps": stamps, "first_loss": lines[0]["logit"], "own_step_s": statistics.median(own),
            "student_dir": str(out / "student"), "peak_rss_mb": max(peak.values())}  # fmt: skip


def vm_hwm_mb(pid: int) -> float:
    """Peak RSS of process ``pid`` (VmHWM, MB). Not ``ru_maxrss``: Linux carries that over fork + exec, so a
    worker would report its parent's peak."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def rank_hwm_mb(launcher: int, known: list[int]) -> dict[int, float]:
    """VmHWM (peak RSS, MB) of the launch/distill.py rank(s) under the deepspeed launcher ``launcher``; the
    process table is scanned only until a rank is found (``known``), then only its /proc status is read."""
    import psutil

    try:
        if not known:
            children = psutil.Process(launcher).children(recursive=True)
            known = [c.pid for c in children if "--local_rank" in " ".join(c.cmdline())]
        return {pid: vm_hwm_mb(pid) for pid in known}
    except (psutil.Error, OSError, IndexError):
        return {}  # a process that just ended


def run_trl(work: Path, out: Path, spec: dict) -> dict:
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    rows = json.loads((work / "train_tokens.json").read_text())
    args = GKDConfig(
        output_dir=str(out), per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lmbda=0.0, beta=1.0, seq_kd=False, max_length=spec["max_length"],
        train_sampling_strategy="sequential", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=spec["seed"],
        dataloader_num_workers=0, disable_dropout=True,
    )  # fmt: skip
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32),
        args=args, train_dataset=Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
        processing_class=AutoTokenizer.from_pretrained(work / "student"),
        data_collator=lambda feats: {k: v for k, v in batch_of(feats).items() if k != "labels"} | {"labels": batch_of(feats)["unshifted"]},
        callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(out / "student"))
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {"stamps": stamps, "first_loss": first, "student_dir": str(out / "student")}


class TTStepClock:
    """A torchtune metric logger (``metric_logger._component_``) that stamps each step's log call."""

    def __init__(self, path: str):
        self.file = open(path, "a")  # noqa: SIM115

    def log_config(self, config) -> None:
        pass

    def log(self, name, data, step) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload, step) -> None:
        row = {"t": time.perf_counter(), "step": step, **{k: float(v) for k, v in payload.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def tt_tokenizer(pad_id: int):
    """The recipe reads only ``pad_id`` from its tokenizer; our ids come pre-tokenised."""
    return argparse.Namespace(pad_id=pad_id, max_seq_len=None)


def tt_dataset(tokenizer, path: str):
    """Our rows in training order, torchtune layout: ``tokens`` and unshifted ``labels`` (the recipe shifts)."""
    rows = json.loads(Path(path).read_text())
    return [{"tokens": r["input_ids"], "labels": [-100] + r["labels"][:-1]} for r in rows]


def tt_constant_lr(optimizer, num_training_steps: int, last_epoch: int = -1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0, last_epoch)


def tt_model_args(cfg: dict) -> dict:
    """torchtune llama3_2 builder arguments for an HF LLaMA config (scale_factor 1 = unscaled RoPE)."""
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"], max_seq_len=2048,
                intermediate_dim=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"], rope_base=int(theta),
                scale_factor=1, tie_word_embeddings=True)  # fmt: skip


def tt_config(variant: str, work: Path, out: Path, spec: dict, clock: Path):
    from omegaconf import OmegaConf

    rank = spec["lora_rank"]
    checkpointer = {"_component_": "torchtune.training.FullModelHFCheckpointer", "model_type": "LLAMA3_2",
                    "checkpoint_files": ["model.safetensors"], "output_dir": str(out), "recipe_checkpoint": None}  # fmt: skip
    losses = {"tt-rkl": ("torch.nn.CrossEntropyLoss", "torchtune.modules.loss.ReverseKLLoss"),
              "tt-fkl": ("torchtune.modules.loss.CEWithChunkedOutputLoss", "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss")}  # fmt: skip
    ce, kd = losses[variant]
    cfg = {
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "seed": spec["seed"], "epochs": 1,
        "max_steps_per_epoch": spec["steps"], "resume_from_checkpoint": False, "gradient_accumulation_steps": 1,
        "clip_grad_norm": None, "kd_ratio": 1.0, "compile": False, "shuffle": False, "batch_size": spec["batch"],
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "log_every_n_steps": 1, "log_peak_memory_stats": False, "profiler": {"enabled": False},
        "metric_logger": {"_component_": "peers.TTStepClock", "path": str(clock)},
        "model": {"_component_": "torchtune.models.llama3_2.lora_llama3_2", **tt_model_args(spec["student_config"]),
                  "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                  "apply_lora_to_output": False, "lora_rank": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0},
        "teacher_model": {"_component_": "torchtune.models.llama3_2.llama3_2", **tt_model_args(spec["teacher_config"])},
        "checkpointer": {**checkpointer, "checkpoint_dir": str(work / "student")},
        "teacher_checkpointer": {**checkpointer, "checkpoint_dir": str(work / "teacher"), "output_dir": str(out / "teacher")},
        "tokenizer": {"_component_": "peers.tt_tokenizer", "pad_id": spec["pad_id"]},
        "dataset": {"_component_": "peers.tt_dataset", "path": str(work / "train_tokens.json")},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": spec["lr"], "betas": [0.9, 0.999], "eps": 1e-8,
                      "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "peers.tt_constant_lr"},
        "loss": {"_component_": ce}, "kd_loss": {"_component_": kd},
    }  # fmt: skip
    return OmegaConf.create(cfg)


def tt_recipe():
    """torchtune's single-device KD recipe module (the recipes folder is not an importable package)."""
    import importlib.util

    import torchtune

    path = Path(torchtune.__file__).parents[1] / "recipes" / "knowledge_distillation_single_device.py"
    spec = importlib.util.spec_from_file_location("tt_kd_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torchtune(variant: str, work: Path, out: Path, spec: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))  # the components above, as module `peers`
    clock = out / "steps.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    recipe = tt_recipe().KDRecipeSingleDevice(cfg := tt_config(variant, work, out, spec, clock))
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    rows = [json.loads(x) for x in clock.read_text().splitlines()]
    student = out / "student"  # the merged (base + LoRA) weights in HF layout, next to the student's config
    shutil.copytree(work / "student", student, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in (out / "epoch_0").glob("model-*.safetensors"):
        shutil.copy(f, student / ("model.safetensors" if "00001-of-00001" in f.name else f.name))
    return {"stamps": [r["t"] for r in rows], "first_loss": rows[0]["kd_loss"], "student_dir": str(student)}


def worker(variant: str, work: Path, out: Path, port: int) -> None:
    torch.set_num_threads(1)
    spec = json.loads((work / "spec.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if variant.startswith("flexkd"):
        result = run_flexkd(variant, work, out, spec, port)
    elif variant == "trl-gkd-rkl":
        result = run_trl(work, out, spec)
    else:
        result = run_torchtune(variant, work, out, spec)
    result.setdefault("peak_rss_mb", vm_hwm_mb(os.getpid()))
    result.update(
        variant=variant,
        wall_s=time.perf_counter() - start,
        steps_s=step_times(result.pop("stamps"), spec["warmup"]),
    )
    (out.parent / f"{out.name}.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------ checks and the driver
def first_step_check(work: Path, spec: dict) -> dict:
    """The first training batch, the initial student: each framework's loss function on the same logits."""
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDTrainer

    from flexkd_ds.method import losses
    from flexkd_ds.method.fused_logits import fused_linear_divergence

    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    batch = batch_of(json.loads((work / "train_tokens.json").read_text())[: spec["batch"]])
    with torch.no_grad():
        s_out = student(input_ids=batch["input_ids"], output_hidden_states=True)
        t_out = teacher(input_ids=batch["input_ids"], output_hidden_states=True)
    return check_values(s_out, t_out, batch, student, teacher, losses, fused_linear_divergence, GKDTrainer)


def check_values(s_out, t_out, batch, student, teacher, losses, fused, gkd) -> dict:
    mask = batch["labels"] != -100
    s_logits, t_logits = s_out.logits, t_out.logits
    n = int(mask.sum())
    log_q, log_p = s_logits[mask].double().log_softmax(-1), t_logits[mask].double().log_softmax(-1)
    ref_rkl = float((log_q.exp() * (log_q - log_p)).sum() / n)
    ref_fkl = float((log_p.exp() * (log_p - log_q)).sum() / n)
    teacher_entropy = float(-(log_p.exp() * log_p).sum() / n)
    fused_rkl = fused(s_out.hidden_states[-1][mask], student.lm_head.weight, t_out.hidden_states[-1][mask],
                      teacher.lm_head.weight, kind="rkl").divergence_sum  # fmt: skip
    values = {
        "tokens": n,
        "reference_rkl_float64": ref_rkl,
        "flexkd_rkl": float(losses.logit_divergence(s_logits, t_logits, mask, kind="rkl")),
        "flexkd_rkl_fused": float(fused_rkl) / n,
        "trl_gkd_beta1": float(
            gkd.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], batch["unshifted"][:, 1:], beta=1.0)
        ),  # fmt: skip
        "reference_fkl_float64": ref_fkl,
        "flexkd_fkl": float(losses.logit_divergence(s_logits, t_logits, mask, kind="fkl")),
        "teacher_entropy": teacher_entropy,
    }
    try:
        from torchtune.modules.loss import ForwardKLLoss, ReverseKLLoss

        flat = (s_logits.flatten(0, 1), t_logits.flatten(0, 1), batch["labels"].flatten())
        values["torchtune_rkl"] = float(ReverseKLLoss()(*flat))
        values["torchtune_fkl"] = float(ForwardKLLoss()(*flat))
    except ImportError as e:  # torchtune 0.6 needs torchao with torchao.dtypes.nf4tensor (<= 0.15)
        values["torchtune_error"] = str(e).strip().splitlines()[0]
    return values


def evaluate(work: Path, spec: dict, results: list[dict]) -> dict:
    """``heldout_metrics`` of the initial student, the teacher (NLL only) and each run's student."""
    from transformers import AutoModelForCausalLM

    held = json.loads((work / "heldout_tokens.json").read_text())
    batches = [batch_of(held[i : i + 8]) for i in range(0, len(held), 8)]
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
    cached = {}  # the teacher's logits, once per batch

    def teacher_logits(ids, attn):
        key = int(ids.sum()) * 31 + ids.shape[0]
        if key not in cached:
            cached[key] = teacher(input_ids=ids, attention_mask=attn).logits
        return cached[key]

    def of(path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return heldout_metrics(logits_of(model), teacher_logits, batches)

    out = {
        "initial_student": of(work / "student"),
        "teacher": heldout_metrics(teacher_logits, teacher_logits, batches),
    }
    for r in results:
        out[r["run"]] = of(r["student_dir"])
    return out


def summarise(spec: dict, results: list[dict], heldout: dict, check: dict) -> str:
    """The markdown table: pooled median step time (range of the per-round medians), tokens/s of all B x T
    tokens, peak RSS (max over rounds), median wall time of the process, held-out numbers (first round), the
    step-1 logged loss, and each peer's step time over flexkd-ds's for the same objective: pooled, and paired
    (per round, then the median and range over rounds: the load of the shared machine drifts between rounds)."""
    by = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    tokens = spec["batch"] * spec["max_length"]
    rows, med, rounds = [], {}, {}
    for v in VARIANTS:
        if v not in by:
            continue
        rounds[v] = {r["run"].rsplit("-r", 1)[1]: statistics.median(r["steps_s"]) for r in by[v]}
        med[v] = statistics.median([s for r in by[v] for s in r["steps_s"]])
        h = heldout[by[v][0]["run"]]
        ratio = paired = "-"
        if (base := SAME_OBJECTIVE.get(v)) in med:
            ratio = f"{med[v] / med[base]:.2f}"
            pairs = [rounds[v][k] / rounds[base][k] for k in rounds[v] if k in rounds[base]]
            paired = f"{statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
        per_round = rounds[v].values()
        rows.append(f"| {v} | {med[v]:.3f} ({min(per_round):.3f}-{max(per_round):.3f}) | {tokens / med[v]:.0f} | "
                    f"{max(r['peak_rss_mb'] for r in by[v]):.0f} | {statistics.median(r['wall_s'] for r in by[v]):.0f} | "
                    f"{h['nll']:.3f} | {h['rkl']:.4f} | {by[v][0]['first_loss']:.6f} | {ratio} | {paired} |")  # fmt: skip
    head = ("| run | median step s (per-round medians) | tokens/s | peak RSS MB | process wall s | held-out NLL | "
            "held-out rkl | step-1 logged loss | step time / flexkd-ds, pooled | paired per round |\n"
            "|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    init, teach = heldout["initial_student"], heldout["teacher"]
    lines = [head, *rows, "", f"initial student: held-out NLL {init['nll']:.3f}, rkl {init['rkl']:.4f}; "
             f"teacher NLL {teach['nll']:.3f} ({init['tokens']} response tokens)", "",
             "first-step loss check (same batch, initial student): " + json.dumps(check)]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny random LLaMA pair, byte tokenizer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="default outputs/peers-quick | outputs/peers")
    parser.add_argument("--port", type=int, default=29750)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = (args.work or REPO / "outputs" / ("peers-quick" if args.quick else "peers")).resolve()
    if args.worker:
        return worker(args.worker[0], work, Path(args.worker[1]), args.port)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torch.set_num_threads(1)
    spec = prepare(work, args.quick, args.seed)
    check = first_step_check(work, spec)
    print("first-step check:", json.dumps(check, indent=1), flush=True)
    results = []
    for k in range(args.rounds):
        for v in args.variants.split(","):
            out = work / "runs" / f"{v}-r{k}"
            cmd = [
                sys.executable,
                __file__,
                "--work",
                str(work),
                "--port",
                str(args.port),
                "--worker",
                v,
                str(out),
            ]
            if not (out.parent / f"{out.name}.json").exists():  # a rerun keeps the runs that finished
                print(f"round {k + 1}: {v}", flush=True)
                subprocess.run(cmd, env=env, cwd=REPO, check=True)
            results.append({**json.loads((out.parent / f"{out.name}.json").read_text()), "run": out.name})
    firsts = {}
    for r in results:
        firsts.setdefault(r["variant"], r["run"])
    heldout = evaluate(work, spec, [r for r in results if r["run"] == firsts[r["variant"]]])
    report = {"spec": {k: v for k, v in spec.items() if not k.endswith("_config")}, "check": check,
              "runs": results, "heldout": heldout}  # fmt: skip
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(summarise(spec, results, heldout, check))


if __name__ == "__main__":
    main()
