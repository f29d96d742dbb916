"""Small PNG plots stored beside the artifacts they describe."""

from __future__ import annotations

import io


def loss_curve_png(history: list[dict]) -> bytes:
    """Training loss (and each loss term) against step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history]
    for key in [k for k in (history[0] if history else {}) if k not in ("step", "lr")]:
        ax.plot(steps, [h[key] for h in history], label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
