"""Pipeline helpers that need no Ray instance."""

import os

from coin_ray.config import Config, load_config
from coin_ray.ray.pipeline import STAGES, stages_to_run
from coin_ray.location import resolve_config as with_absolute_paths
from coin_ray.run import STAGE_NAMES, RunDir, stage_settings


def test_local_paths_become_absolute_and_others_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    cfg = with_absolute_paths(load_config(None, [
        "storage=runs", "data.target_images=imgs", "data.val_annotations=s3://b/val.json",
        "clip.model=clip", "cloud.url=http://127.0.0.1:1"]))
    assert cfg.storage == str(tmp_path / "runs")
    assert cfg.data.target_images == str(tmp_path / "imgs")
    assert cfg.data.val_annotations == "s3://b/val.json"
    assert cfg.clip.model == str(tmp_path / "clip")
    assert cfg.cloud.url == "http://127.0.0.1:1"
    hub = with_absolute_paths(load_config(None, ["clip.model=openai/clip-vit-base-patch16"]))
    assert hub.clip.model == "openai/clip-vit-base-patch16"
    voc = with_absolute_paths(load_config(None, ["data.val_format=voc", "data.val_images=val"]))
    assert voc.data.val_images == "val" and os.path.isabs(voc.storage)


def test_requested_stages_are_forced_and_the_rest_resume(tmp_path):
    run = RunDir(str(tmp_path))
    run.mark_done("collect")
    run.mark_done("disseminate")
    assert stages_to_run(run, None) == ["clip_det", "distill", "evaluate", "export"]
    assert stages_to_run(run, ["distill", "disseminate"]) == ["disseminate", "distill"]
    assert not run.is_done("disseminate") and run.is_done("collect")


def test_a_stage_run_with_other_settings_runs_again_with_every_later_stage(tmp_path, capsys):
    run = RunDir(str(tmp_path))
    cfg = load_config(None, ["model.region_features=pooled"])
    for stage in STAGE_NAMES:
        run.mark_done(stage, settings=stage_settings(cfg, stage))
    assert stages_to_run(run, None, cfg) == []
    # The target's backbone and the logging cadence do not touch the CLIP detector.
    same_clip_det = load_config(None, ["model.region_features=pooled", "model.target_backbone=resnet18",
                                       "train.disseminate.log_every=1"])
    assert stages_to_run(run, None, same_clip_det) == ["distill", "evaluate", "export"]
    assert "model.target_backbone: clip -> resnet18" in capsys.readouterr().out
    for stage in ("distill", "evaluate", "export"):
        run.mark_done(stage, settings=stage_settings(same_clip_det, stage))
    crops = load_config(None, ["model.region_features=crops", "model.target_backbone=resnet18"])
    assert stages_to_run(run, None, crops) == ["disseminate", "clip_det", "distill", "evaluate", "export"]
    assert "model.region_features: pooled -> crops" in capsys.readouterr().out
    assert run.is_done("collect")


def test_a_stage_run_again_starts_fresh_not_from_its_old_checkpoints(tmp_path):
    run = RunDir(str(tmp_path))
    for name in ("checkpoint_2026-11-30_17-56-03.656006", "checkpoint_2026-11-30_17-56-50.863277"):
        (tmp_path / "distill" / name).mkdir(parents=True)
        (tmp_path / "distill" / name / "state.pt").write_bytes(b"old")
    (tmp_path / "distill" / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "distill" / "model.pt").write_bytes(b"old model")
    run.mark_done("distill")
    assert len(run.checkpoints("distill")) == 3 and run.checkpoints("clip_det") == []
    assert stages_to_run(run, ["distill"]) == ["distill"]
    assert sorted(p.name for p in (tmp_path / "distill").iterdir()) == ["model.pt"]


def test_a_stage_recorded_without_settings_is_kept(tmp_path):
    run = RunDir(str(tmp_path))
    for stage in STAGE_NAMES:
        run.mark_done(stage)
    assert stages_to_run(run, None, load_config(None, ["train.distill.steps=5"])) == []


def test_the_stage_table_runs_in_the_manifest_order():
    assert tuple(STAGES) == STAGE_NAMES
    assert all(fn.__name__ == f"stage_{name}" for name, fn in STAGES.items())


def test_a_change_of_epochs_runs_the_training_stages_again_and_unset_keys_are_not_settings(tmp_path, capsys):
    run = RunDir(str(tmp_path))
    cfg = load_config(None, ["train.distill.epochs=20"])
    for stage in STAGE_NAMES:
        run.mark_done(stage, settings=stage_settings(cfg, stage))
    assert stage_settings(cfg, "distill")["train.distill.epochs"] == 20.0
    assert "train.distill.steps" not in stage_settings(cfg, "distill")
    assert stages_to_run(run, None, cfg) == []
    assert stages_to_run(run, None, load_config(None, ["train.distill.epochs=30"])) == ["distill", "evaluate", "export"]
    assert "train.distill.epochs: 20.0 -> 30.0" in capsys.readouterr().out
    # The defaults are recorded as the epochs they stand for, so a changed default re-runs too.
    assert stage_settings(Config(), "disseminate")["train.disseminate.epochs"] == 50.0
    assert stage_settings(Config(), "distill")["train.distill.epochs"] == 65.0


def test_closing_lines_name_only_folders_that_exist_and_call_the_tiny_world_a_plumbing_check(tmp_path):
    """Issue 27, 4.5 / 4.6: a collect-only run printed a TensorBoard hint for a folder that did
    not exist, and the tiny try's zeros read as a verdict on COIN."""
    from coin_ray.demo import PLUMBING_NOTE, is_plumbing_check
    from coin_ray.ray.pipeline import closing_lines
    from coin_ray.world.build import world_root

    cfg = load_config(None, [f"storage={tmp_path}", f"data.target_images={tmp_path / 'imgs'}"])
    run = RunDir(str(tmp_path / "run"))
    run.mark_done("collect")
    lines = closing_lines(cfg, run, "")
    assert not any("tensorboard" in l or l.startswith("report:") for l in lines) and "answer cache" in lines[-1]
    os.makedirs(run.tensorboard)
    os.makedirs(run.report_dir)
    lines = closing_lines(cfg, run, "| Method |\n")
    assert any(f"--logdir {run.tensorboard}" in l for l in lines) and f"report: {run.report_dir}" in lines
    assert not is_plumbing_check(cfg) and not any(PLUMBING_NOTE in l for l in lines)

    root = world_root("tiny", 0, str(tmp_path / "w"), cfg.data.cloud_confusion)
    tiny = load_config(None, ["data.world=tiny", f"data.world_cache={tmp_path / 'w'}",
                              f"data.target_images={root}/target/train"])
    assert is_plumbing_check(tiny) and any(PLUMBING_NOTE in l for l in closing_lines(tiny, run, "| t |\n"))
    said_once = "\n".join(closing_lines(tiny, run, f"| t |\n\n{PLUMBING_NOTE}\n"))
    assert said_once.count(PLUMBING_NOTE) == 1
    assert not is_plumbing_check(load_config(None, ["data.world=demo", f"data.world_cache={tmp_path / 'w'}",
                                                    f"data.target_images={root}/target/train"]))
