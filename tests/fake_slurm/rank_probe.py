"""A stand-in rank for tests/test_launch.py's fast launcher tests (no torch): writes its rank environment
and arguments to $PROBE_DIR/rank<RANK>.json, then waits for SIGUSR1 / SIGTERM (recorded in the same file,
exit 0) or, with PROBE_FAIL_RANK equal to its rank, exits 3 at once; PROBE_EXIT_AT_ONCE=1 exits 0 at once."""

import json
import os
import signal
import sys
import time
from pathlib import Path

rank = os.environ["RANK"]
path = Path(os.environ["PROBE_DIR"]) / f"rank{rank}.json"
keys = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "SLURM_NODEID",
    "OMP_NUM_THREADS",
)
record = {
    "env": {k: os.environ.get(k) for k in keys},
    "argv": sys.argv[1:],
    "pid": os.getpid(),
    "signals": [],
}


def write():
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def handle(signum, frame):
    record["signals"].append(signal.Signals(signum).name)


signal.signal(signal.SIGUSR1, handle)
signal.signal(signal.SIGTERM, handle)
write()
if os.environ.get("PROBE_FAIL_RANK") == rank:
    sys.exit(3)
if os.environ.get("PROBE_EXIT_AT_ONCE") == "1":
    sys.exit(0)
deadline = time.monotonic() + 120
while not record["signals"] and time.monotonic() < deadline:
    time.sleep(0.05)
write()
sys.exit(0 if record["signals"] else 4)
