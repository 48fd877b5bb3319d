#!/usr/bin/env python
"""Score the teacher's last hidden units (Flex-KD function-tangent importance) and write importance.safetensors.

  deepspeed --num_gpus 2 launch/score.py --config launch/recipes/tiny.yaml
  python launch/score.py --config launch/recipes/tiny.yaml --compare other/importance.safetensors

Runs over importance.num_examples training examples sharded over all ranks, reduces the sums exactly, and
prints the top units, the tail mass at d_S and (with --compare) the overlap of the two selections.
"""

from flexkd_ds.config import parse_args
from flexkd_ds.scoring import run_score


def main(argv=None) -> None:
    cfg, extra = parse_args(
        argv,
        prog="score.py",
        description=__doc__,
        extra_args=[("--compare", "an importance file to compare the new selection with")],
    )
    run_score(cfg, compare=extra.compare)


if __name__ == "__main__":
    main()
