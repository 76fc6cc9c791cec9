"""Image domains of Foggy-Shapes: the clear source domain and the foggy target domain.

Fog follows the atmospheric scattering model used by Foggy-Cityscapes:
    I(x) = J(x) * t(x) + A * (1 - t(x)),   t(x) = exp(-beta * depth(x))
with J the clear image in [0, 1], depth in metres, A the atmospheric light (one RGB colour
per image) and beta the fog density drawn per image. Foggy-Cityscapes uses beta in
{0.005, 0.01, 0.02} on real depths up to hundreds of metres; our scenes are shallower
(objects at 5-60 m), so beta is scaled up to give a comparable loss of contrast.

``apply_domain`` is the one switch between styles, so another target style (night,
clipart) is one more branch there.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Domain = Literal["clear", "fog"]
DOMAINS: tuple[str, ...] = ("clear", "fog")
FOG_BETA_RANGE = (0.03, 0.08)  # per metre, drawn uniformly per image
SENSOR_NOISE = 0.012  # std of additive Gaussian noise, both domains


def fog(image: np.ndarray, depth: np.ndarray, beta: float, airlight: np.ndarray) -> np.ndarray:
    """Atmospheric scattering: ``image * t + airlight * (1 - t)``, ``t = exp(-beta * depth)``.

    Args:
        image: (H, W, 3) float32 in [0, 1], the clear scene.
        depth: (H, W) float32 metres.
        beta: fog density per metre (>= 0).
        airlight: (3,) float32 in [0, 1].
    Returns:
        (H, W, 3) float32 in [0, 1].
    """
    t = np.exp(-beta * depth.astype(np.float32))[..., None]
    return (image * t + np.asarray(airlight, np.float32) * (1.0 - t)).astype(np.float32)


def apply_domain(image: np.ndarray, depth: np.ndarray, domain: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """Turn a clear render into ``domain``; returns (uint8 (H, W, 3) image, the style params).

    Both domains get the same per-image exposure change and sensor noise, so the only
    systematic difference between them is the style itself.
    """
    gain = float(rng.uniform(0.85, 1.1))
    out = np.clip(image * gain, 0.0, 1.0)
    params: dict[str, float] = {"gain": gain}
    if domain == "fog":
        beta = float(rng.uniform(*FOG_BETA_RANGE))
        grey = float(rng.uniform(0.72, 0.92))
        airlight = np.clip(grey + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0)
        out = fog(out, depth, beta, airlight)
        params.update(beta=beta, airlight=grey)
    elif domain != "clear":
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    out = out + rng.normal(0.0, SENSOR_NOISE, out.shape).astype(np.float32)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), params
