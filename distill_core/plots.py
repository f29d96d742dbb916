"""Small PNG plots stored beside the artifacts they describe."""

from __future__ import annotations

import io


def loss_curve_png(history: list[dict]) -> bytes:
    """Training loss (and each loss term) against step, as PNG bytes. A term missing from some steps (the
    on-policy and other steps of a round train different terms) is drawn over the steps that have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in [k for k in dict.fromkeys(k for h in history for k in h) if k not in ("step", "lr")]:
        ax.plot([h["step"] for h in history if key in h], [h[key] for h in history if key in h], label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return _palette_png(buf.getvalue())


def _palette_png(png: bytes, colors: int = 64) -> bytes:
    """The image with at most ``colors`` colours: about a third of the bytes of matplotlib's RGBA PNG,
    which matters because the run report embeds it (base64) in a Prefect artifact."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors).save(out, format="PNG", optimize=True)
    return out.getvalue()
