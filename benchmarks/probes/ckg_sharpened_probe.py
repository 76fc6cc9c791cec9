"""Probe, not a product setting: does the CKG side with the cloud because the cloud is surer?
Backs docs/fidelity.md, "Why: the separation statistics" (the sharpened-CLIP probe).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probes/ckg_sharpened_probe.py --temperature 0.5 \\
        --world bench --seeds 0 --tables 1 --no-oracle --steps 2000 --storage runs-probe \\
        --from-run RUN_DIR train.disseminate.steps=1800 model.target_backbone=mobilenet_v3

Runs ``coin_tables.py`` (every argument after ``--temperature T`` is its own) with the CKG
seeing the CLIP detector's probs sharpened, p ** (1 / T) renormalised over the K+1 classes,
on every box it fuses or learns from. At T = 0.5 a CLIP-detector probability of 0.34 on its
label, with the rest spread over the other classes, becomes about 0.68: as sure as the cloud
on the bench world's disagreements (``disagreement_confidence``). Nothing else changes: L_pri
and the separation still see the CLIP detector's own probs. Use its own ``--storage``: the
tables' cache does not know about the temperature.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # coin_tables.py

import torch  # noqa: E402

import coin_tables  # noqa: E402
from coin_ray.models.ckg import CKG  # noqa: E402


def sharpened(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """(R, K+1) probs -> p ** (1 / temperature), rows renormalised to 1."""
    powered = probs.clamp_min(1e-12) ** (1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--temperature":
        raise SystemExit("usage: ckg_sharpened_probe.py --temperature T [coin_tables.py arguments]")
    temperature = float(sys.argv[2])
    if temperature <= 0:
        raise SystemExit("--temperature must be > 0")
    original = CKG.forward

    def forward(self: CKG, features: torch.Tensor, cloud_probs: torch.Tensor,
                clip_probs: torch.Tensor) -> torch.Tensor:
        return original(self, features, cloud_probs, sharpened(clip_probs, temperature))

    CKG.forward = forward  # every CKG built from here on, in this process only
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    coin_tables.main()


if __name__ == "__main__":
    main()
