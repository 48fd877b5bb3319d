#!/usr/bin/env python
"""Distil a teacher LLM into a narrower student with Flex-KD on DeepSpeed.

  deepspeed --num_gpus 2 launch/distill.py                              # built-in quickstart
  deepspeed --num_gpus 8 launch/distill.py --config launch/recipes/opt-6.7b-to-1.3b.yaml
  deepspeed launch/distill.py --config launch/recipes/tiny.yaml output_dir=runs/t train.max_steps=5

Scores the teacher's last hidden units (or reuses <output_dir>/importance.safetensors), trains the student
with alpha * L_feature + beta * L_logit + lambda * L_sup, writes metrics.jsonl, checkpoints and the student in
Hugging Face format under output_dir. Every config key can be overridden as key=value (listed below).
"""

from flexkd_ds.inputs.config import parse_args
from flexkd_ds.jobs.common import expected_errors
from flexkd_ds.jobs.distill import run_distill


def main(argv=None) -> None:
    cfg = parse_args(argv, prog="distill.py", description=__doc__)
    with expected_errors("distill.py"):
        run_distill(cfg)


if __name__ == "__main__":
    main()
