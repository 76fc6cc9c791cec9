"""The serving parts without Ray (coin_ray.deploy): routes, token, caps, prompts, answers,
the model card, and ``coin-ray serve --model``'s one-line refusals."""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coin_ray.cloud.http_backend import answer_from_json, answer_to_json, request_to_json
from coin_ray.cloud.imageio import encode_png
from coin_ray.commands import add_serve_args, serve_settings
from coin_ray.deploy import (DetectRequest, RequestError, ServeSettings, answer_for, authorised, decode_capped,
                             http_request, model_card, presented_token, prompt_labels, route, serve_command,
                             token_digest)
from coin_ray.errors import EXIT_CREDENTIAL, CredentialError, UserError

CATEGORIES = ["car", "person", "traffic_light"]
ROOT = Path(__file__).resolve().parents[1]


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as err:
        fn(*args)
    return err.value


def test_prompts_map_to_categories_and_unknown_ones_are_all_named():
    assert prompt_labels(["Cars", "the person.", "traffic light"], CATEGORIES) == [0, 1, 2]
    err = refused(prompt_labels, ["car", "unicorn", "bus"], CATEGORIES)
    assert err.status == 400 and "unknown categories: 'unicorn', 'bus'" in err.message
    assert "car, person, traffic_light" in err.message
    assert refused(prompt_labels, [], CATEGORIES).status == 400


def test_routes_and_their_refusals():
    assert route("GET", "/v1/health", False) == "health" and route("POST", "/v1/detect", False) == "detect"
    assert route("POST", "/v2/task/dinox/detection", True) == "task"
    assert route("GET", "/v2/task_status/ab12", True) == "status"
    assert refused(route, "GET", "/v1/detect", False).status == 405
    assert refused(route, "POST", "/v2/task/dinox/detection", False).status == 404  # dds is off
    assert refused(route, "GET", "/v2/task_status/../../etc", True).status == 404


def test_the_token_is_compared_by_digest_and_read_from_either_header():
    digest = token_digest("s3cret")
    assert authorised("s3cret", digest) and not authorised("s3cre", digest) and not authorised("", digest)
    assert authorised("anything", "") and token_digest("") == ""
    assert presented_token({"authorization": "Bearer s3cret"}, dds=False) == "s3cret"
    assert presented_token({"authorization": "Basic s3cret"}, dds=False) == ""
    assert presented_token({"token": "s3cret", "authorization": "Bearer x"}, dds=True) == "s3cret"


def test_caps_refuse_before_decoding_and_bad_images_are_400():
    png = encode_png(np.zeros((300, 200, 3), np.uint8))
    assert decode_capped(png, 300 * 200).shape == (300, 200, 3)
    err = refused(decode_capped, png, 300 * 200 - 1)
    assert err.status == 413 and "200x300 = 60000 pixels" in err.message
    assert refused(decode_capped, b"not an image", 10**6).status == 400
    assert refused(decode_capped, png[:100], 10**6).status == 400
    body = json.dumps(request_to_json(png, ["car"], 0.5)).encode()
    assert refused(http_request, body, CATEGORIES, ServeSettings(max_request_bytes=len(body) - 1)).status == 413
    wanted = http_request(body, CATEGORIES, ServeSettings())
    assert wanted.labels == [0] and wanted.threshold == 0.5 and wanted.image.shape == (300, 200, 3)


@pytest.mark.parametrize("body, says", [
    (b"{", "malformed JSON"), (b'"a string"', "not an object"),
    (b'{"prompts": ["car"]}', "missing field 'image'"),
    (json.dumps({"image": "%%%", "prompts": ["car"]}).encode(), "not valid base64"),
    (json.dumps({"image": base64.b64encode(b"x").decode(), "prompts": "car"}).encode(), "not a list of strings"),
    (json.dumps({"image": base64.b64encode(b"x").decode(), "prompts": ["car"], "threshold": "hi"}).encode(),
     "'threshold' is not a number"),
])
def test_each_malformed_request_is_one_400_line(body, says):
    err = refused(http_request, body, CATEGORIES, ServeSettings())
    assert err.status == 400 and says in err.message and "\n" not in err.message


def test_answers_keep_the_asked_categories_above_the_threshold_with_full_probs():
    probs = np.asarray([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]], np.float32)
    found = {"boxes": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.asarray([0, 1, 0]),
             "scores": np.asarray([0.7, 0.6, 0.1], np.float32), "probs": probs}
    request = DetectRequest(np.zeros((4, 4, 3), np.uint8), [0], 0.5, "")
    answer = answer_for(found, request, CATEGORIES)
    assert answer.phrases == ["car"] and answer.boxes.tolist() == [[0, 1, 2, 3]]
    # The cloud's schema: a client asking for a subset gets probs re-ordered to its categories.
    parsed = answer_from_json(answer_to_json(answer, CATEGORIES, "m"), ["person", "car"])
    np.testing.assert_allclose(parsed.probs, [[0.1 / 0.9, 0.7 / 0.9, 0.1 / 0.9]], rtol=1e-6)


def write_export(folder: Path, onnx: bool = True) -> None:
    folder.mkdir(parents=True)
    meta = {"categories": CATEGORIES, "batch_sizes": [1], "input_size": [160, 256],
            "onnx": {"file": "model.onnx"} if onnx else {"skipped": "with_onnx=False"}}
    (folder / "export.json").write_text(json.dumps(meta))
    (folder / "model.onnx").write_bytes(b"onnx bytes")
    (folder / "detector_b1.pt").write_bytes(b"torchscript bytes")


def test_the_model_card_names_the_run_its_score_and_the_served_files(tmp_path):
    pytest.importorskip("onnxruntime")
    write_export(tmp_path / "run-7" / "export")
    (tmp_path / "run-7" / "report").mkdir()
    (tmp_path / "run-7" / "report" / "metrics.json").write_text(json.dumps({"COIN": {"map50": 36.25}}))
    card = model_card(str(tmp_path / "run-7" / "export"))
    assert (card.run_id, card.val_map50, card.runtime, card.input_size) == ("run-7", 36.25, "onnx", (160, 256))
    torchscript = model_card(str(tmp_path / "run-7" / "export"), "torchscript")
    assert torchscript.export_sha256 != card.export_sha256 and card.model_name.startswith("coin-run-7-")
    write_export(tmp_path / "loose")
    assert model_card(str(tmp_path / "loose")).run_id == "" and model_card(str(tmp_path / "loose")).val_map50 is None
    write_export(tmp_path / "old" / "export", onnx=False)
    assert model_card(str(tmp_path / "old" / "export")).runtime == "torchscript"
    with pytest.raises(ValueError, match="no ONNX model.*--runtime torchscript"):
        model_card(str(tmp_path / "old" / "export"), "onnx")


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(["--run", "r", *argv])


def test_serve_settings_from_the_command_line(monkeypatch):
    monkeypatch.setenv("COIN_SERVE_TOKEN", "t0k")
    settings = serve_settings(serve_args("--token-env", "COIN_SERVE_TOKEN", "--max-batch-size", "16",
                                         "--batch-wait-ms", "5", "--protocol", "dds", "--max-replicas", "3"))
    assert settings.token_sha256 == token_digest("t0k") and "t0k" not in repr(settings)
    assert (settings.max_batch_size, settings.batch_wait_s, settings.dds, settings.max_replicas) == (16, 0.005, True, 3)
    monkeypatch.delenv("COIN_SERVE_TOKEN")
    with pytest.raises(CredentialError, match="--token-env COIN_SERVE_TOKEN: the variable is not set"):
        serve_settings(serve_args("--token-env", "COIN_SERVE_TOKEN"))
    with pytest.raises(UserError, match="max_batch_size must be >= 1"):
        serve_settings(serve_args("--max-batch-size", "0"))


def test_coin_ray_serve_refuses_an_unset_token_in_one_line_with_exit_3(tmp_path):
    write_export(tmp_path / "run" / "export")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    env.pop("COIN_SERVE_UNSET", None)
    done = subprocess.run([sys.executable, "-m", "coin_ray.cli", "serve", "--run", str(tmp_path / "run"),
                           "--token-env", "COIN_SERVE_UNSET"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CREDENTIAL and len(done.stderr.strip().splitlines()) == 1
    assert "error: --token-env COIN_SERVE_UNSET: the variable is not set" in done.stderr


def test_the_printed_serve_command_parses_as_coin_ray_serve():
    from coin_ray.cli import build_parser

    command = serve_command("/tmp/my runs/demo-0")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.command, args.run, args.host, args.port) == ("serve", "/tmp/my runs/demo-0", "127.0.0.1", 8000)


def test_a_run_with_an_export_ends_by_printing_the_command_that_serves_it(tmp_path):
    from coin_ray.config import load_config
    from coin_ray.ray.pipeline import closing_lines
    from coin_ray.run import RunDir

    cfg = load_config(None, [f"storage={tmp_path}", f"data.target_images={tmp_path / 'imgs'}"])
    run = RunDir(str(tmp_path / "run"))
    run.mark_done("collect")
    assert not any("coin-ray serve" in line for line in closing_lines(cfg, run, ""))
    run.mark_done("export")
    assert any(line.endswith(serve_command(run.root)) for line in closing_lines(cfg, run, ""))
