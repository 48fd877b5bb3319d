#!/usr/bin/env python
"""Cut a student out of the teacher: keep its highest-scored hidden units (the importance file's indices, in
file order), optionally its most important layers and MLP neurons, and write a Hugging Face student dir.

  deepspeed --num_gpus 2 launch/prune.py --config launch/recipes/tiny.yaml \\
      'model.student_arch={from_teacher: true, hidden_size: 32}' prune.num_layers=1

  python launch/prune.py model.student_arch.hidden_size=384            # SmolLM2-135M -> 384 wide, all layers

The student's width is model.student_arch.hidden_size; prune.num_layers and prune.intermediate_size choose
depth and MLP width (null = keep the teacher's); prune.calibrate_norms rescales the norms. The teacher runs as
its ZeRO-3 inference engine and each of its tensors is gathered and sliced alone, so no rank holds it whole.
Writes <output_dir>/importance.safetensors (reused when it matches) and prune.dir (default
<output_dir>/pruned_student) with prune.json: the kept units, layers, neurons, the importance file's hash and
the calibration. Train it with `launch/distill.py model.student_init=pruned` (same output_dir), which reuses
both files, or pass the dir as model.student.
"""

from flexkd_ds.inputs.config import parse_args
from flexkd_ds.jobs.common import expected_errors
from flexkd_ds.jobs.prune import run_prune


def main(argv=None) -> None:
    cfg = parse_args(argv, prog="prune.py", description=__doc__)
    with expected_errors("prune.py"):
        run_prune(cfg)


if __name__ == "__main__":
    main()
