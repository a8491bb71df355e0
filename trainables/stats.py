"""How sure an accuracy is: measured on a few images, it is a binomial proportion with an interval."""

from __future__ import annotations

import math


def wilson_interval(accuracy: float, images: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% interval of an accuracy measured on this many images (Wilson's score interval, which
    stays inside 0..1): at 1,000 images and 55%, about 52% to 58%."""
    if images <= 0:
        return 0.0, 1.0
    center = (accuracy + z * z / (2 * images)) / (1 + z * z / images)
    spread = (
        z
        * math.sqrt(accuracy * (1 - accuracy) / images + z * z / (4 * images * images))
        / (1 + z * z / images)
    )
    return max(0.0, center - spread), min(1.0, center + spread)
