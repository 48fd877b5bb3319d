"""``python -m flexkd_ds.launcher node|supervise``: the stable entry point of the per-node launcher (SLURM
scripts call it); the code is ``flexkd_ds.runtime.launcher``."""

from flexkd_ds.runtime.launcher import main

if __name__ == "__main__":
    raise SystemExit(main())
