import pytest
import yaml

from coin_ray.config import (PAPER_HALF_LIFE, PAPER_RUN_STEPS, Config, ConfigError, from_dict, keep_rate, load_config,
                             to_yaml, with_updates)
from coin_ray.config_doc import default_config_yaml


def test_defaults_are_the_papers():
    cfg = load_config()
    d = cfg.train.distill
    assert (d.gamma1, d.gamma2, d.lambda_, d.pi) == (0.1, 0.1, 10.0, 0.7)
    # eta and the teacher's keep rate are time constants: on the paper's 65k-step run the
    # default half-life gives its 0.9996 per step.
    paper = with_updates(cfg, [f"train.distill.steps={PAPER_RUN_STEPS}"]).train.distill
    assert round(paper.eta, 4) == round(paper.teacher_keep_rate, 4) == 0.9996


def test_half_lives_are_fractions_of_the_run():
    assert keep_rate(0.5, 2) == pytest.approx(0.5)  # half-life 1 step: half kept per step
    assert keep_rate(0.25, 8) == pytest.approx(0.5 ** 0.5)
    assert keep_rate(0.1, 0) == keep_rate(0.0, 100) == 0.0
    assert keep_rate(PAPER_HALF_LIFE, PAPER_RUN_STEPS) == pytest.approx(0.9996, abs=2e-7)
    # The same fraction on a 2000-step run: a 53.4-step half-life, not 1733 steps.
    d = with_updates(Config(), ["train.distill.steps=2000", "train.distill.eta_half_life=0.05"]).train.distill
    assert d.eta == pytest.approx(0.5 ** (1 / 100))
    assert d.teacher_keep_rate == pytest.approx(0.5 ** (1 / (2000 * PAPER_HALF_LIFE)))
    assert with_updates(Config(), ["train.disseminate.steps=100"]).train.disseminate.eta == pytest.approx(
        0.5 ** (1 / (100 * PAPER_HALF_LIFE)))


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"distill": {"lambda": 5, "pi": 0.5}},
                                    "data": {"categories": ["car", "traffic light"]}}))
    cfg = load_config(str(path), ["train.distill.gamma1=0.2", "cloud.backend=dds"])
    assert cfg.train.distill.gamma1 == 0.2
    assert cfg.train.distill.lambda_ == 5.0 and isinstance(cfg.train.distill.lambda_, float)
    assert cfg.train.distill.pi == 0.5
    assert cfg.cloud.backend == "dds"
    assert cfg.data.categories == ["car", "traffic light"]


@pytest.mark.parametrize("override, expected", [
    ("train.distill.gama1=0.2", "train.distill.gama1: unknown key (allowed: steps"),
    ("train.distill.gamma1=abc", "train.distill.gamma1: expected a number, got 'abc'"),
    ("train.distill.pi=1.5", "train.distill.pi: 1.5 is out of range (allowed: [0.0, 1.0])"),
    ("cloud.backend=azure", "cloud.backend: 'azure' is not allowed (allowed: http, dds, rekognition, hf, replay)"),
    ("ray.num_workers=1.5", "ray.num_workers: expected an integer, got 1.5"),
    ("train.distill.use_inc=maybe", "train.distill.use_inc: expected true or false, got 'maybe'"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_prompts_must_name_known_categories():
    with pytest.raises(ConfigError, match="'lorry' is not a category"):
        from_dict({"cloud": {"prompts": {"lorry": ["lorry"]}}})


def test_token_is_referenced_by_env_name_and_never_saved(tmp_path, monkeypatch):
    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("DDS_TOKEN", secret)
    cfg = load_config(None, ["cloud.backend=dds", "cloud.token_env=DDS_TOKEN"])
    text = to_yaml(cfg)
    assert "DDS_TOKEN" in text and secret not in text
    # pasting the token itself where the variable name belongs is refused, without echoing it
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"cloud.token_env={secret}"])
    assert secret not in str(err.value)
    with pytest.raises(ConfigError, match="cloud.token: unknown key"):
        load_config(None, [f"cloud.token={secret}"])


def test_saved_yaml_round_trips():
    cfg = with_updates(Config(), ["train.distill.gamma2=0.3", "data.style=night street"])
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert again.resolved_run_id() == cfg.resolved_run_id()
    assert with_updates(cfg, ["seed=1"]).resolved_run_id() != cfg.resolved_run_id()


def test_a_length_in_both_epochs_and_steps_is_a_one_line_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.distill.epochs=20", "train.distill.steps=100"])
    assert str(err.value).startswith("train.distill.epochs: set train.distill.epochs or train.distill.steps, not both")
    assert "\n" not in str(err.value)
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"train": {"disseminate": {"epochs": 5, "steps": 10}}}))
    with pytest.raises(ConfigError, match=r"^train\.disseminate\.epochs: "):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^train\.distill\.epochs: 0\.0 is out of range \(allowed: \(0\.0, inf"):
        load_config(None, ["train.distill.epochs=0"])


def test_an_override_of_one_length_key_replaces_the_other_from_the_file(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"train": {"distill": {"epochs": 65}}}))
    short = load_config(str(path), ["train.distill.steps=200"]).train.distill
    assert (short.steps, short.epochs) == (200, None)
    assert with_updates(load_config(str(path)), ["train.distill.steps=3"]).train.distill.steps == 3
    back = with_updates(with_updates(Config(), ["train.distill.steps=3"]), ["train.distill.epochs=2.5"]).train.distill
    assert (back.steps, back.epochs) == (None, 2.5)
    default = load_config().train
    assert (default.distill.steps, default.distill.epochs, default.disseminate.steps, default.disseminate.epochs) == \
        (None, None, None, None)


def test_coin_ray_config_shows_both_length_keys_with_ranges_and_what_null_means():
    text = default_config_yaml()
    assert "    steps: null  # [0, inf) or null; fixes the length instead of epochs; null = from epochs" in text
    assert "    epochs: null  # (0.0, inf) or null; passes over the images; null = 65 (reference)" in text
    assert "    epochs: null  # (0.0, inf) or null; passes over the images; null = 50 (reference)" in text
    assert from_dict(yaml.safe_load(text)) == Config()
