"""What the classification and seq2seq jobs share with distill's causal-LM loop: the setup (preemption handler
first, process group, logging, the resume-config check), the student engine with its sampler and resume,
the per-step agreement on the normaliser and on a preemption signal, metrics.jsonl and the progress bar,
checkpoints."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.jobs.common import setup_logging
from flexkd_ds.method.objective import ObjectiveWeights
from flexkd_ds.runtime import sampling
from flexkd_ds.runtime.dist import all_reduce_sum, init_distributed
from flexkd_ds.runtime.engines import build_student_engine
from flexkd_ds.runtime.preemption import Preemption

logger = logging.getLogger("flexkd_ds")


class TaskRun:
    """One run of a task job. ``start_student`` builds the engine and resumes; then per step ``next_batches``,
    ``agree`` (False: a preemption checkpoint was written, return), ``log`` and ``after_step``; ``finish``."""

    def __init__(self, cfg: DistillConfig) -> None:
        from flexkd_ds.jobs.distill import check_resume_config

        self.preemption = Preemption.install()  # first: a signal during loading waits for a safe boundary
        self.start_time = time.perf_counter()
        self.env = init_distributed()
        setup_logging(self.env)
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.weights = ObjectiveWeights.from_config(cfg.loss)
        check_resume_config(cfg, self.out / "checkpoints", self.env.world_size)

    def start_student(
        self, module, s_ds: dict, num_examples: int, importance_hash: str | None, desc: str
    ) -> int:
        """The student's engine (AdamW, the lr schedule), the sampler, resume; returns the first step."""
        from flexkd_ds.jobs.distill import lr_multiplier, resume, trim_metrics

        t, env = self.cfg.train, self.env

        def optimizer_factory(params):
            return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                                     weight_decay=t.weight_decay)  # fmt: skip

        self.engine = build_student_engine(module, s_ds, optimizer_factory, lr_multiplier(t))
        self.sampler = sampling.ResumableDistributedSampler(num_examples, rank=env.rank, world_size=env.world_size,
                                                            seed=self.cfg.seed)  # fmt: skip
        self.importance_hash = importance_hash
        start = resume(self.cfg, self.engine, self.sampler, self.out / "checkpoints", importance_hash, env)
        if env.is_main:
            trim_metrics(self.out / "metrics.jsonl", start)
        self.metrics = open(self.out / "metrics.jsonl", "a") if env.is_main else None  # noqa: SIM115
        self.bar = tqdm(total=t.max_steps, initial=start, desc=desc, disable=not env.is_main, unit="step")
        return start

    def next_batches(self, dataset, collate) -> list:
        """This step's ``grad_accum`` micro-batches (``collate(list of examples)``), the sampler's state kept for
        a preemption checkpoint."""
        self._sampler_before = self.sampler.state_dict()
        size = self.cfg.train.micro_batch_size
        return [
            collate([dataset[i] for i in self.sampler.next_indices(size)])
            for _ in range(self.cfg.train.grad_accum)
        ]

    def agree(self, local_count: int, step: int) -> float | None:
        """The all-reduced normaliser of the step, or None when a rank got a preemption signal: then the
        checkpoint (before this step's examples) is written and the job returns."""
        agreed = all_reduce_sum(torch.tensor([float(local_count), float(self.preemption.requested)],
                                             device=self.env.device))  # fmt: skip
        if agreed[1] > 0:
            logger.info("preemption signal: checkpointing at step %d and exiting", step)
            self.sampler.load_state_dict(self._sampler_before)
            self.checkpoint(step)
            return None
        return float(agreed[0])

    def checkpoint(self, step: int) -> None:
        from flexkd_ds.jobs.distill import checkpoint

        checkpoint(self.engine, self.sampler, self.out / "checkpoints", step, self.importance_hash, self.cfg)

    def log(self, record: dict) -> None:
        """A step's numbers: metrics.jsonl (every ``train.log_every`` steps and the last), the bar, checkpoints."""
        t, step = self.cfg.train, record["step"]
        if self.metrics is not None and (step % t.log_every == 0 or step == t.max_steps):
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            self.checkpoint(step)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
