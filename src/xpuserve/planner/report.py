"""The plan as a text table, as JSON, and as a PNG chart comparing chips."""

from __future__ import annotations

import json
import math

from xpuserve.planner.plan import PlanRow, Workload, cheapest, smallest_fit

COLUMNS = (
    ("chip", "chip", "{}"), ("layout", "layout", "{}"), ("fits", "fits", "{}"), ("chips", "chips_needed", "{}"),
    ("GB w/chip", "weights_gb_per_chip", "{:.1f}"), ("batch", "max_batch", "{}"),
    ("prefill tok/s/chip", "prefill_tps_per_chip", "{:.0f}"), ("decode tok/s/chip", "decode_tps_per_chip", "{:.0f}"),
    ("TTFT ms", "ttft_ms", "{:.0f}"), ("TPOT ms", "tpot_ms", "{:.1f}"),
    ("$/M in", "usd_per_m_input", "{:.3f}"), ("$/M out", "usd_per_m_output", "{:.3f}"),
)


def summary_rows(rows: list[PlanRow], work: Workload) -> list[PlanRow]:
    """Per chip: the smallest unit that fits and the cheapest layout; or, if nothing fits, why."""
    out: list[PlanRow] = []
    for chip in dict.fromkeys(r.chip for r in rows):
        picks = [smallest_fit(rows, chip), cheapest(rows, chip, work)]
        picks = [p for i, p in enumerate(picks) if p is not None and p not in picks[:i]]
        if not picks:  # the largest unit tried says best why it does not fit
            picks = [max((r for r in rows if r.chip == chip), key=lambda r: r.unit_chips)]
        out += picks
    return out


def table(rows: list[PlanRow]) -> str:
    def cell(row: PlanRow, attr: str, fmt: str) -> str:
        value = getattr(row, attr)
        if not row.fits and attr not in ("chip", "layout", "fits", "weights_gb_per_chip"):
            return "-"
        return "inf" if isinstance(value, float) and math.isinf(value) else fmt.format(value)

    cells = [[h for h, _, _ in COLUMNS]] + [[cell(r, a, f) for _, a, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{r.chip} {r.layout}: {r.reason}" for r in rows if r.reason]
    return "\n".join(lines + ([""] + notes if notes else []))


def to_json(model: str, rows: list[PlanRow], summary: list[PlanRow], settings: dict) -> str:
    def clean(d: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    return json.dumps({"model": model, "settings": settings, "summary": [clean(r.to_dict()) for r in summary],
                       "layouts": [clean(r.to_dict()) for r in rows]}, indent=2)


def plot(rows: list[PlanRow], path: str, title: str) -> None:
    """Writes the chart of `chart` as a PNG."""
    import matplotlib.pyplot as plt

    fig = chart(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart(rows: list[PlanRow], title: str):
    """Bars per chip: decode and prefill tokens/s per chip, and $ per million output and input tokens."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'xpuserve[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitting = [r for r in rows if r.fits]
    if not fitting:
        raise ValueError("nothing to plot: no chip and layout fits")
    labels = [f"{r.chip}\n{r.layout}" for r in fitting]
    x = range(len(fitting))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(fitting) + 4), 4.8))
    width = 0.4
    ax1.bar([i - width / 2 for i in x], [r.decode_tps_per_chip for r in fitting], width, label="decode (output)")
    ax1.bar([i + width / 2 for i in x], [r.prefill_tps_per_chip for r in fitting], width, label="prefill (input)")
    ax1.set_ylabel("tokens/s per chip")
    ax1.set_title("Throughput per chip")
    ax2.bar([i - width / 2 for i in x], [r.usd_per_m_output for r in fitting], width, label="output tokens")
    ax2.bar([i + width / 2 for i in x], [r.usd_per_m_input for r in fitting], width, label="input tokens")
    ax2.set_ylabel("US$ per million tokens")
    ax2.set_title("Cost per million tokens")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_xlabel("chip and layout")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
