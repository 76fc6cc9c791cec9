"""fit() fits again, from the newest checkpoint, when Ray Train loses a worker under its controller
or the controller itself."""

from __future__ import annotations

import pytest
import ray.exceptions
import ray.train

from coin_ray.config import load_config
from coin_ray.ray import train


class TrainerThatFails:
    """A TorchTrainer stand-in whose first ``fit()`` calls raise the given errors in turn."""

    errors: list[Exception] = []
    fits = 0

    def __init__(self, *args, **kwargs) -> None:
        self.run_config = kwargs["run_config"]

    def fit(self) -> str:
        TrainerThatFails.fits += 1
        if TrainerThatFails.errors:
            raise TrainerThatFails.errors.pop(0)
        return f"fitted {self.run_config.name}"


@pytest.fixture
def trainer(monkeypatch):
    monkeypatch.setattr(train, "TorchTrainer", TrainerThatFails)
    TrainerThatFails.fits = 0
    return TrainerThatFails


def lost_worker() -> ray.train.ControllerError:
    return ray.train.ControllerError(ray.exceptions.ActorDiedError())


def test_a_worker_lost_under_the_controller_is_fitted_again_under_the_same_name(trainer, tmp_path, capsys):
    trainer.errors = [lost_worker()]
    result = train.fit(lambda config: None, {}, load_config(None), name="distill", storage_path=str(tmp_path))
    assert result == "fitted distill" and trainer.fits == 2
    assert "[distill] Ray Train lost a worker while restarting its group" in capsys.readouterr().out


def test_other_controller_errors_and_too_many_losses_are_raised(trainer, tmp_path):
    cfg = load_config(None)
    trainer.errors = [ray.train.ControllerError(ValueError("bad callback"))]
    with pytest.raises(ray.train.ControllerError, match="bad callback"):
        train.fit(lambda config: None, {}, cfg, name="distill", storage_path=str(tmp_path))
    assert trainer.fits == 1

    trainer.fits = 0
    trainer.errors = [lost_worker() for _ in range(3)]
    with pytest.raises(ray.train.ControllerError):
        train.fit(lambda config: None, {}, cfg, name="distill", storage_path=str(tmp_path), max_failures=2)
    assert trainer.fits == 3


def test_a_controller_that_died_is_fitted_again_under_the_same_name_a_bounded_number_of_times(trainer, tmp_path,
                                                                                          capsys):
    cfg = load_config(None)
    trainer.errors = [ray.exceptions.ActorDiedError()]
    result = train.fit(lambda config: None, {}, cfg, name="disseminate", storage_path=str(tmp_path))
    assert result == "fitted disseminate"
    assert trainer.fits == 2
    assert "[disseminate] Ray Train's controller died; resuming from the newest checkpoint" in capsys.readouterr().out

    trainer.fits = 0
    trainer.errors = [ray.exceptions.ActorDiedError() for _ in range(3)]
    with pytest.raises(ray.exceptions.ActorDiedError):
        train.fit(lambda config: None, {}, cfg, name="distill", storage_path=str(tmp_path), max_failures=2)
    assert trainer.fits == 3
