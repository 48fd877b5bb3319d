#!/usr/bin/env python
"""Score the teacher's last hidden units (Flex-KD function-tangent importance) and write importance.safetensors.

  deepspeed --num_gpus 2 launch/score.py --config launch/recipes/tiny.yaml
  python launch/score.py --config launch/recipes/tiny.yaml --compare other/importance.safetensors

Runs over importance.num_examples training examples sharded over all ranks, reduces the sums exactly, and
prints the top units, the tail mass at d_S and (with --compare) the overlap of the two selections.

Check that the scores found units the teacher depends on (docs/ablation.md), in one process:

  python launch/score.py --config launch/recipes/tiny.yaml --ablate --percents 5 10 20 50 --random-draws 3 \\
      --eval-data ../shared/data/instruct/dolly_valid.jsonl --max-rows 100 --stability --subsets 3

--ablate zeroes the top / bottom / random p% of the teacher's last hidden units and reports the response NLL
against the unablated teacher; it reuses <output_dir>/importance.safetensors (scoring first when it is
missing). --stability scores disjoint subsets of the scoring data and reports the overlap of their top-d_S
selections. An --eval-data file whose rows carry an 'options' list (or --options for all rows) is a
classification set: the accuracy of the best-scoring option is reported beside the NLL. Both write
<output_dir>/ablation.json and ablation.md. Put key=value overrides before
--percents (which takes every number after it).
"""

import argparse

from flexkd_ds.inputs.config import ConfigError, build_arg_parser, load_config
from flexkd_ds.jobs.ablate import run_ablate
from flexkd_ds.jobs.common import expected_errors
from flexkd_ds.jobs.score import run_score


def percent(text: str) -> float:
    """argparse type of --percents: a number strictly between 0 and 100."""
    if "=" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a percent; put key=value overrides before --percents"
        )
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 100): a percent of the teacher's units")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = build_arg_parser("score.py", __doc__)
    parser.add_argument(
        "--compare", metavar="PATH", help="an importance file to compare the new selection with"
    )
    ablate = parser.add_argument_group("importance ablation and selection stability (single process)")
    ablate.add_argument(
        "--ablate", action="store_true", help="zero top / bottom / random p%% units; report NLL"
    )
    ablate.add_argument(
        "--percents", type=percent, nargs="+", default=[5.0, 10.0, 20.0, 50.0], metavar="P",
        help="percents of the teacher's d_T units to zero (default: 5 10 20 50); k = p * d_T / 100 rounded half up, >= 1",
    )  # fmt: skip
    ablate.add_argument(
        "--random-draws", type=positive_int, default=3, metavar="N",
        help="random selections per percent, seeds seed..seed+N-1; mean ± std reported (default 3)",
    )  # fmt: skip
    ablate.add_argument(
        "--eval-data", metavar="PATH",
        help="MiniLLM-layout JSONL to measure response NLL on (default: training examples not scored)",
    )  # fmt: skip
    ablate.add_argument(
        "--options", nargs="+", metavar="ANSWER",
        help="the candidate answers of every --eval-data row, for a classification set without an 'options' "
        "column (e.g. --options positive negative); adds accuracy to the ablation",
    )  # fmt: skip
    ablate.add_argument(
        "--max-rows", type=positive_int, metavar="N",
        help="use the first N evaluation rows (default: all of --eval-data; 64 held-out training examples)",
    )  # fmt: skip
    ablate.add_argument(
        "--stability", action="store_true", help="overlap of the top-d_S selections over disjoint subsets"
    )
    ablate.add_argument(
        "--subsets", type=positive_int, default=3, metavar="N",
        help="disjoint subsets of the importance.num_examples scored examples (>= 2; default 3)",
    )  # fmt: skip
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.config, ns.overrides)
    except ConfigError as error:
        parser.error(str(error))
    if ns.stability and ns.subsets < 2:
        parser.error(f"--subsets {ns.subsets}: stability compares selections, pass --subsets 2 or more")
    if not (ns.ablate or ns.stability):
        with expected_errors("score.py"):
            run_score(cfg, compare=ns.compare)
        return
    if ns.compare is not None:
        parser.error("--compare belongs to the scoring run; run it without --ablate / --stability")
    if ns.options is not None and ns.eval_data is None:
        parser.error("--options gives the answers of the --eval-data rows: pass --eval-data PATH too")
    with expected_errors("score.py"):
        run_ablate(
            cfg,
            ablate=ns.ablate,
            percents=ns.percents,
            random_draws=ns.random_draws,
            eval_data=ns.eval_data,
            max_rows=ns.max_rows,
            stability=ns.stability,
            subsets=ns.subsets,
            options=ns.options,
        )


if __name__ == "__main__":
    main()
