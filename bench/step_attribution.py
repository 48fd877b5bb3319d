"""Where one process's distillation step goes: flexkd-ds's step against the same step without DeepSpeed.

Issue 20 measured flexkd-ds about 10-20 % slower per step than TRL at the full peers shape on one process,
on a shared machine. This splits the step into its parts on the peers' models and batches
(``python bench/peers.py`` writes them; ``--work`` points at that folder), all in ONE process and one thread,
the variants interleaved step by step so a change in the machine's load hits all of them alike:

- ``plain-whole``  plain PyTorch, TRL's arithmetic: teacher and student logits on all B x T rows, reverse KL
                   on the response rows, ``torch.optim.AdamW``;
- ``plain-fused``  plain PyTorch, flexkd-ds's arithmetic: the teacher without its head, the student's
                   ``DistillStudent`` with the chunked loss on the response rows only, ``torch.optim.AdamW``;
- ``ds-zero0`` / ``ds-zero1`` / ``ds-zero2``  the same module and loss in a DeepSpeed engine at that ZeRO stage
                   (the shipped ``ds_configs/student_zero2.json`` for stage 2), the teacher a replicated
                   DeepSpeed inference engine (``ds_configs/teacher_replicated.json``), the step as the trainer
                   calls it: ``engine.backward(loss)``, ``engine.step()``.

Each step is timed in parts: teacher forward, student forward + loss, backward, optimizer step. Every variant
starts from the same student weights and sees the same batches; the losses of the first step are printed so
one can see the variants compute the same thing.

    python bench/step_attribution.py --work outputs/peers --steps 12 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PARTS = ("teacher", "forward", "backward", "optimizer")
VARIANTS = ("plain-whole", "plain-fused", "ds-zero0", "ds-zero1", "ds-zero2")


def rkl_whole(student_logits, teacher_logits, mask):
    """Reverse KL(q_S || p_T) summed over the masked rows of whole (B, T, V) logits, over their count."""
    log_q = student_logits[mask].float().log_softmax(-1)
    log_p = teacher_logits[mask].float().log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum() / mask.sum()


class Variant:
    """One way of running the step, with its own copy of the student and its optimizer."""

    def __init__(self, name: str, work: Path, lr: float, teacher) -> None:
        from transformers import AutoModelForCausalLM

        from flexkd_ds.jobs.step import DistillStudent
        from flexkd_ds.method.objective import ObjectiveWeights

        self.name, self.times = name, {p: [] for p in PARTS}
        self.first_loss = None
        student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
        self.weights = ObjectiveWeights(feature_loss="none", logit_loss="rkl", beta=1.0, lm_weight=0.0)
        self.plain_teacher, self.teacher_engine = teacher
        if name == "plain-whole":
            self.model = student.train()
        else:
            self.model = DistillStudent(student).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.engine = None
        if name.startswith("ds-"):
            import deepspeed

            stage = int(name[-1])
            if stage == 2:
                ds = json.loads((REPO / "ds_configs" / "student_zero2.json").read_text())
            else:
                ds = {"zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
            ds.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                       "gradient_clipping": 0.0, "bf16": {"enabled": False}})  # fmt: skip
            self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=ds)
        else:
            self.optimizer = optimizer

    def teacher_hidden(self, batch):
        """(B, T, d_T) teacher LM-head input without the head: the plain module or the DeepSpeed engine."""
        from flexkd_ds.runtime.engines import head_skipped

        with torch.no_grad():
            if self.name.startswith("ds-"):
                engine, capture = self.teacher_engine
                with head_skipped(engine.module):
                    engine(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                    )
                return capture.pop()
            out = self.plain_teacher.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            return out.last_hidden_state

    def step(self, batch) -> float:
        from flexkd_ds.jobs.step import FusedRequest, flat_rows

        clock = time.perf_counter
        t0 = clock()
        if self.name == "plain-whole":
            with torch.no_grad():
                teacher_logits = self.plain_teacher(input_ids=batch["input_ids"]).logits
        else:
            hidden = self.teacher_hidden(batch)
            rows = batch["label_rows"]
            head = self.plain_teacher.get_output_embeddings()
            request = FusedRequest(labels=flat_rows(batch["labels"], rows), teacher_hidden=flat_rows(hidden, rows),
                                   teacher_head=(head.weight.detach(), None), weights=self.weights)  # fmt: skip
        t1 = clock()
        if self.name == "plain-whole":
            logits = self.model(input_ids=batch["input_ids"]).logits
            loss = rkl_whole(logits, teacher_logits, batch["labels"] != -100)
        else:
            module = self.engine if self.engine is not None else self.model
            terms, _, _ = module(batch["input_ids"], batch["attention_mask"], logit_rows=rows, fused=request)
            loss = terms.loss / rows.numel()
        t2 = clock()
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()
        t3 = clock()
        if self.engine is not None:
            self.engine.step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        t4 = clock()
        for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.times[part].append(seconds)
        return float(loss)


def load_batches(work: Path, batch: int) -> list[dict]:
    rows = json.loads((work / "train_tokens.json").read_text())
    out = []
    for i in range(0, len(rows) - batch + 1, batch):
        ids = torch.tensor([r["input_ids"] for r in rows[i : i + batch]])
        labels = torch.tensor([r["labels"] for r in rows[i : i + batch]])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "label_rows": (labels.reshape(-1) != -100).nonzero().flatten()})  # fmt: skip
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "outputs" / "peers", help="bench/peers.py's folder"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="passes over the training batches")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each variant not timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the table and raw times (json) here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top operators of one step of each variant (after the rounds)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29791")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed
    from transformers import AutoModelForCausalLM

    from flexkd_ds.runtime.engines import HeadInput

    deepspeed.init_distributed(dist_backend="gloo")
    spec = json.loads((args.work / "spec.json").read_text())
    batches = load_batches(args.work, spec["batch"])
    teacher = AutoModelForCausalLM.from_pretrained(args.work / "teacher", dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_ds = json.loads((REPO / "ds_configs" / "teacher_replicated.json").read_text())
    t_ds.update({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False}})
    t_engine, *_ = deepspeed.initialize(model=teacher, config=t_ds)
    t_engine.eval()
    capture = HeadInput(teacher)
    names = [v for v in args.variants.split(",") if v]
    variants = [Variant(n, args.work, spec["lr"], (teacher, (t_engine, capture))) for n in names]
    torch.manual_seed(0)
    for r in range(args.rounds):
        for i, batch in enumerate(batches):
            for v in variants:  # interleaved: the same batch, one variant after the other
                loss = v.step(batch)
                if r == 0 and i == 0:
                    v.first_loss = loss
            if r == 0 and i < args.warmup:
                for v in variants:
                    v.times = {p: [] for p in PARTS}
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    if args.profile:
        from torch.profiler import profile

        for v in variants:
            with profile() as prof:
                v.step(batches[0])
            print(f"== {v.name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    tokens = spec["batch"] * spec["max_length"]
    base = None
    lines = ["| variant | step s (median) | " + " | ".join(f"{p} s" for p in PARTS) + " | tokens/s | step / plain-whole | first loss |",
             "| --- " * (len(PARTS) + 5) + "|"]  # fmt: skip
    report = {}
    for v in variants:
        totals = [sum(parts) for parts in zip(*(v.times[p] for p in PARTS), strict=True)]
        med = statistics.median(totals)
        base = base or (med if v.name == "plain-whole" else None)
        report[v.name] = {"step_s": totals, **v.times, "first_loss": v.first_loss}
        parts = " | ".join(f"{statistics.median(v.times[p]):.3f}" for p in PARTS)
        ratio = f"{med / base:.2f}" if base else "-"
        lines.append(
            f"| {v.name} | {med:.3f} | {parts} | {tokens / med:.0f} | {ratio} | {v.first_loss:.7f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attribution.json").write_text(json.dumps(report, indent=1))
        (args.out / "attribution.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
