"""Every model a run loads is checked before any stage and any paid call (issue 27, 4.1):
a folder, an s3:// folder or a hub id that cannot be loaded is one line naming the key."""

from __future__ import annotations

import json

import pytest

from coin_ray.config import load_config
from coin_ray.errors import UserError
from coin_ray.model_check import CLIP_TYPES, HF_DETECTOR_TYPES, check_model
from coin_ray.preflight import check_models


def saved_model(folder, model_type: str = "clip", files=("model.safetensors", "processor_config.json")):
    """A folder laid out as ``save_pretrained`` leaves it (the weights' bytes are not read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in files:
        (folder / name).write_text("x")
    return folder


def test_a_saved_clip_folder_passes(tmp_path):
    check_model("clip.model", str(saved_model(tmp_path / "clip")), CLIP_TYPES)


@pytest.mark.parametrize("files, model_type, needle", [
    (("processor_config.json",), "clip", "has no weights"),
    (("pytorch_model.bin",), "clip", "has no image processor"),
    (("model.safetensors", "preprocessor_config.json"), "siglip", "is a 'siglip' model; expected 'clip'"),
])
def test_an_incomplete_or_other_folder_is_one_line(tmp_path, files, model_type, needle):
    folder = saved_model(tmp_path / "m", model_type, files)
    with pytest.raises(UserError, match=needle) as err:
        check_model("clip.model", str(folder), CLIP_TYPES)
    assert str(err.value).startswith(f"clip.model: {folder}") and "\n" not in str(err.value)


def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(UserError, match=f"clip.model: {tmp_path}/nope is not a model folder"):
        check_model("clip.model", str(tmp_path / "nope"), CLIP_TYPES)


def test_a_hub_id_not_in_the_cache_fails_at_once_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="clip.model: coin-test/no-such-clip is not in the local Hugging Face cache"):
        check_model("clip.model", "coin-test/no-such-clip", CLIP_TYPES)


def test_a_hub_id_the_hub_cannot_give_is_one_line(monkeypatch):
    """No network (this machine) or no such repo (a machine with one): both stop here."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="cloud.model: cannot load coin-test/no-such-detector from the Hugging Face hub"):
        check_model("cloud.model", "coin-test/no-such-detector", HF_DETECTOR_TYPES)


def test_an_s3_folder_is_checked_without_downloading(s3_bucket, tmp_path):
    from coin_ray import storage

    storage.upload_dir(saved_model(tmp_path / "clip"), f"s3://{s3_bucket}/clip")
    check_model("clip.model", f"s3://{s3_bucket}/clip", CLIP_TYPES)
    with pytest.raises(UserError, match=f"clip.model: s3://{s3_bucket}/other does not exist"):
        check_model("clip.model", f"s3://{s3_bucket}/other", CLIP_TYPES)


def test_the_run_checks_clip_always_and_the_hf_backend_only_when_collecting(tmp_path):
    clip = saved_model(tmp_path / "clip")
    hf = ["cloud.backend=hf", f"cloud.model={tmp_path / 'owl'}", f"clip.model={clip}"]
    check_models(load_config(None, hf), collect=False)
    with pytest.raises(UserError, match="cloud.model: .*owl is not a model folder"):
        check_models(load_config(None, hf), collect=True)
    saved_model(tmp_path / "owl", "owlv2")
    check_models(load_config(None, hf), collect=True)
    with pytest.raises(UserError, match="clip.model: .*is a 'owlv2' model"):
        check_models(load_config(None, [f"clip.model={tmp_path / 'owl'}"]), collect=False)
    with pytest.raises(UserError, match="clip.model: empty"):
        check_models(load_config(None, [f"data.target_images={tmp_path}"]), collect=False)
