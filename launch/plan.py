#!/usr/bin/env python
r"""Dry run before the queue: does a recipe fit on N nodes x G GPUs, and if not, what should change?

  python launch/plan.py --config launch/recipes/llama-7b-to-1.3b.yaml --nodes 1 --gpus-per-node 8
  python launch/plan.py --config launch/recipes/opt-6.7b-to-1.3b.yaml --nodes 2 --gpus-per-node 4 \
      --gpu-mem-gb 40 --json plan.json train.micro_batch_size=2

Builds the teacher and the student on the meta device from their configs (shipped ones for the recipes'
hub models, a local directory's config.json, or model.*_arch; no weights, no network), validates the pair
(vocab, d_S < d_T, tokenizer family, data.max_length vs positions) and the batch layout, and estimates the
per-GPU memory of the teacher's ZeRO-3 shard, the student's ZeRO model states and one micro-batch's
activations and logits, from the recipe's DeepSpeed files. When it does not fit it lists what to change,
cheapest first: smaller micro-batch, more GPUs, sharding / offload, shorter data.max_length.
docs/planning.md explains the numbers. Exit code: 0 fits, 2 does not fit, 1 invalid recipe or pair.
"""

import json
import sys
from pathlib import Path

from flexkd_ds.inputs.config import ConfigError, build_arg_parser, load_config
from flexkd_ds.jobs.plan import EXIT_INVALID, PlanError, format_report, plan


def main(argv=None) -> int:
    parser = build_arg_parser(prog="plan.py", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0,
                        help="memory of one GPU in GiB, the card's nominal size (default 80)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON here")

    def invalid(message: str) -> None:  # argparse exits 2, which here means "does not fit"
        parser.print_usage(sys.stderr)
        parser.exit(EXIT_INVALID, f"plan.py: error: {message}\n")

    parser.error = invalid
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.config, ns.overrides)
        report = plan(cfg, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, gpu_mem_gib=ns.gpu_mem_gb)
    except (ConfigError, PlanError) as e:
        invalid(str(e))
    print(format_report(report, ns.config or "built-in defaults (quickstart)"))
    if ns.json:
        Path(ns.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {ns.json}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
