"""What a finished distill run prints and draws: a summary of the segment (steps, tokens, wall time, each loss
term's first and last value, the held-out NLL, where the files are) and ``metrics.png`` (the loss terms and the
validation curve over steps) next to ``metrics.jsonl``. The plot needs matplotlib (in the ``dev`` and ``bench``
extras); without it the summary says how to get it."""

from __future__ import annotations

import json
from pathlib import Path

TERMS = ("loss", "lm", "logit", "feature")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def plot_metrics(rows: list[dict], path: str | Path) -> Path | None:
    """Loss terms (left) and validation NLL (right) over steps; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    for term in TERMS:
        values = [r.get(term, 0.0) for r in rows]
        if any(values):
            left.plot(steps, values, label=term)
    left.set_xlabel("step")
    left.set_ylabel("value (per response token; feature: per batch)")
    left.legend()
    left.grid(alpha=0.3)
    valid = [(r["step"], r["valid_lm"]) for r in rows if "valid_lm" in r]
    if valid:
        right.plot(*zip(*valid, strict=True), marker="o")
    right.set_xlabel("step")
    right.set_ylabel("held-out response NLL (nats/token)")
    right.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(rows: list[dict], wall_s: float, student_dir: Path, metrics: Path, plot: Path | None,
                  heldout: str | None) -> list[str]:  # fmt: skip
    """The end-of-run summary of this segment's logged steps ``rows``."""
    if not rows:
        return [f"done: no step trained in this segment ({_duration(wall_s)}); student: {student_dir}"]
    first, last = rows[0], rows[-1]
    tokens = sum(int(r.get("tokens", 0)) for r in rows)
    lines = [
        f"done: steps {first['step']}..{last['step']} in {_duration(wall_s)}, {tokens:,} response tokens "
        f"(logged steps), {last.get('tokens_per_s', 0):.0f} tokens/s at the last step"
    ]
    terms = [f"{t} {first[t]:.4f} -> {last[t]:.4f}" for t in TERMS if first.get(t) or last.get(t)]
    lines.append("loss terms, first -> last step: " + "; ".join(terms))
    if heldout:
        lines.append(heldout)
    where = f"student {student_dir}; metrics {metrics}"
    where += f"; plot {plot}" if plot else " (pip install matplotlib for metrics.png)"
    lines.append(where)
    return lines
