#!/usr/bin/env python
"""Build an exact offline teacher cache: the teacher's LM-head input for every training example.

  deepspeed --num_gpus 8 launch/cache_teacher.py --config launch/recipes/opt-6.7b-to-1.3b.yaml teacher_cache.dir=cache/opt
  deepspeed --num_gpus 8 launch/distill.py --config launch/recipes/opt-6.7b-to-1.3b.yaml teacher_cache.dir=cache/opt

The teacher runs once as its ZeRO-3 inference engine over the training set (data.*, model.teacher); each rank
writes its shards of safetensors to teacher_cache.dir, then rank 0 writes manifest.json and the COMPLETE
marker. A rerun after a killed build resumes (complete, verified shards are kept). distill with the same
teacher_cache.dir then trains with only the teacher's LM head resident (teacher_cache.dtype=fp32: the live
teacher's numbers exactly; bf16: half the disk). Every config key can be overridden as key=value.
"""

from flexkd_ds.inputs.config import parse_args
from flexkd_ds.jobs.cache_teacher import run_cache_teacher
from flexkd_ds.jobs.common import expected_errors


def main(argv=None) -> None:
    cfg = parse_args(argv, prog="cache_teacher.py", description=__doc__)
    with expected_errors("cache_teacher.py"):
        run_cache_teacher(cfg)


if __name__ == "__main__":
    main()
