import io
import math

from PIL import Image

from distill_core.plots import loss_curve_png


def test_loss_curve_is_a_small_png():
    """The run report embeds this PNG (base64) in a Prefect artifact, so its size matters."""
    noise = lambda i, k: 0.3 * math.sin(i * 12.9898 + k * 78.233) ** 2  # noqa: E731  (deterministic jitter)
    history = [{"step": i + 1, "lr": 3e-4, "loss": 5 * math.exp(-i / 300) + noise(i, 0),
                "forward_kl": 2 * math.exp(-i / 300) + noise(i, 1), "ce": 4 + noise(i, 2)} for i in range(1000)]
    png = loss_curve_png(history)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (600, 350)
    assert len(png) < 25_000, len(png)  # matplotlib's own RGBA PNG of this plot is about 54 kB
