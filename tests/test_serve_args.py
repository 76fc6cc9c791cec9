"""python -m coin_ray.serve: a missing checkpoint is a one-line error, not a traceback."""

from __future__ import annotations

import pytest

from coin_ray.serve import main


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit, match=f"--checkpoint {missing}: no such file"):
        main(["--backend", "foggy-shapes", "--checkpoint", str(missing)])
