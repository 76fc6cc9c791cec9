"""Build (once) and cache a Foggy-Shapes world: splits, the stand-in cloud detector, the stand-in CLIP.

    world = build_world("demo")          # ~/.cache/coin_ray/world/demo-0-confusion0.9, built on first use
    world.target_train_images, world.cloud_detector, world.clip_dir, ...

Cache layout under ``<cache>/world/<size>-<seed>/`` (``<size>-<seed>-confusion<rho>/`` when
``cloud_confusion`` rho > 0; ``<cache>`` = ``cache_dir`` argument, else $COIN_RAY_CACHE, else
~/.cache/coin_ray):
    source_train/ source_val/ target_train/ target_val/   images/*.jpg + annotations.json
    cloud_detector.pt                                     stand-in cloud detector checkpoint
    clip/                                                 stand-in CLIP (save_pretrained)
    manifest.json                                         written last: every file's size,
                                                          sha256 of every non-image file
A world is built in a sibling ``.partial`` folder and renamed into place after its
manifest is written, so an interrupted build never looks finished; a cached world whose
manifest is missing, unreadable, from another generator version, or disagrees with the
files on disk is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from coin_ray.config import FOGGY_SHAPES_CATEGORIES, FOGGY_SHAPES_CLOUD_CONFUSION
from coin_ray.location import cache_home
from coin_ray.world.clip_standin import train_clip
from coin_ray.world.cloud_standin import train_cloud_detector
from coin_ray.world.dataset import SplitSpec, default_workers, write_split

# Bump when the generator or the stand-ins change what a build produces. 3: distractor boxes in
# annotations.json; the stand-in CLIP also learns non-object crops captioned as background.
WORLD_VERSION = 3
STYLE = "foggy street scene"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class WorldSize:
    """How many images each split has and how long the stand-ins train."""

    source_train: int
    target_train: int
    val: int
    detector_steps: int
    clip_steps: int
    clip_batch: int = 64
    width: int = 256
    height: int = 160


SIZES = {
    "tiny": WorldSize(source_train=12, target_train=8, val=6, detector_steps=2, clip_steps=2, clip_batch=8),
    "demo": WorldSize(source_train=600, target_train=300, val=100, detector_steps=600, clip_steps=600),
    "bench": WorldSize(source_train=2400, target_train=1500, val=1000, detector_steps=2400, clip_steps=2400),
}


@dataclass(frozen=True)
class World:
    """Paths of a built world. Images folders hold ``*.jpg``; json files are COCO ground truth."""

    root: Path
    size: str
    seed: int
    target_train_images: Path
    target_train_json: Path
    target_val_images: Path
    target_val_json: Path
    source_val_images: Path
    source_val_json: Path
    source_train_images: Path
    source_train_json: Path
    cloud_detector: Path
    clip_dir: Path
    categories: list[str] = field(default_factory=lambda: list(FOGGY_SHAPES_CATEGORIES))
    style: str = STYLE
    cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION  # rho: see coin_ray.world.cloud_standin.confuse_labels


def world_root(size: str, seed: int = 0, cache_dir: str | Path | None = None,
               cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION) -> Path:
    """Where the world of this size, seed and ``cloud_confusion`` is cached."""
    base = Path(cache_dir or cache_home())
    suffix = f"-confusion{cloud_confusion:g}" if cloud_confusion else ""
    return base.expanduser() / "world" / f"{size}-{seed}{suffix}"


def world_at(root: Path, size: str, seed: int, cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION) -> World:
    """The ``World`` whose files live under ``root`` (no checks)."""
    return World(root, size, seed,
                 root / "target_train" / "images", root / "target_train" / "annotations.json",
                 root / "target_val" / "images", root / "target_val" / "annotations.json",
                 root / "source_val" / "images", root / "source_val" / "annotations.json",
                 root / "source_train" / "images", root / "source_train" / "annotations.json",
                 root / "cloud_detector.pt", root / "clip", cloud_confusion=cloud_confusion)


def build_world(size: str = "demo", cache_dir: str | Path | None = None, seed: int = 0,
                cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION) -> World:
    """Return the cached world, building it first when missing, partial or corrupt.

    ``cloud_confusion`` (rho in [0, 1]): the fraction of rider and train boxes the stand-in
    cloud is trained to call person and bus (``cloud_standin.confuse_labels``); part of
    the cache key, and 0 builds the world without confusion. The default is the documented
    Foggy-Shapes world (``config.FOGGY_SHAPES_CLOUD_CONFUSION``).
    """
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; known: {', '.join(SIZES)}")
    if not 0.0 <= cloud_confusion <= 1.0:
        raise ValueError(f"cloud_confusion must be in [0, 1], got {cloud_confusion}")
    rho = float(cloud_confusion)
    root = world_root(size, seed, cache_dir, rho)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        problem = check_world(root, size, seed, rho)
        if not problem:
            return world_at(root, size, seed, rho)
        if root.exists():
            print(f"[world] cached {size} world at {root} is unusable ({problem}); rebuilding", flush=True)
            shutil.rmtree(root)
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _build(partial, size, seed, rho)
        os.replace(partial, root)
    return world_at(root, size, seed, rho)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per world across processes (the second waits, then finds it built)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Small models on shared CPUs train much faster single-threaded (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(root: Path, size: str, seed: int, cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION) -> None:
    spec, start = SIZES[size], time.time()
    world = world_at(root, size, seed, cloud_confusion)
    print(f"[world] building the {size} Foggy-Shapes world (seed {seed}, cloud_confusion {cloud_confusion:g}) "
          f"in {root}", flush=True)
    splits = [SplitSpec("source_train", "source_train", "clear", spec.source_train, spec.width, spec.height),
              SplitSpec("target_train", "target_train", "fog", spec.target_train, spec.width, spec.height),
              SplitSpec("source_val", "val", "clear", spec.val, spec.width, spec.height),
              SplitSpec("target_val", "val", "fog", spec.val, spec.width, spec.height)]
    workers = default_workers()
    for split in splits:
        write_split(root, split, seed, workers)
        print(f"[world] {split.name}: {split.count} {split.domain} images ({time.time() - start:.0f}s)", flush=True)
    with _torch_threads(1):
        # The two stand-ins train side by side, one core each, when they are big enough to be worth a process.
        clip_job = _start_clip(world, spec, seed) if spec.clip_steps >= 50 else None
        try:
            train_cloud_detector(world.source_train_images, world.source_train_json, world.cloud_detector,
                                 world.categories, steps=spec.detector_steps, seed=seed,
                                 cloud_confusion=cloud_confusion)
        except BaseException:
            if clip_job is not None:
                clip_job.kill()
            raise
        print(f"[world] stand-in cloud detector trained ({time.time() - start:.0f}s)", flush=True)
        if clip_job is None:
            train_clip(world.source_train_images, world.source_train_json, world.clip_dir, world.categories,
                       steps=spec.clip_steps, batch_size=spec.clip_batch, seed=seed)
        elif clip_job.wait() != 0:
            raise RuntimeError(f"training the stand-in CLIP failed (exit code {clip_job.returncode})")
        print(f"[world] stand-in CLIP trained ({time.time() - start:.0f}s)", flush=True)
    write_manifest(root, size, seed, cloud_confusion)
    print(f"[world] done in {time.time() - start:.0f}s", flush=True)


def _start_clip(world: World, spec: WorldSize, seed: int) -> subprocess.Popen:
    """Train the stand-in CLIP in a child process (its output goes to ours)."""
    cmd = [sys.executable, "-m", "coin_ray.world.clip_standin", "--images", str(world.source_train_images),
           "--annotations", str(world.source_train_json), "--out", str(world.clip_dir),
           "--steps", str(spec.clip_steps), "--batch-size", str(spec.clip_batch), "--seed", str(seed)]
    return subprocess.Popen(cmd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, size: str, seed: int, cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION) -> Path:
    """Record every file of the world (size; sha256 unless a JPEG); written last."""
    files = {str(p.relative_to(root)): p.stat().st_size for p in _files(root)}
    hashes = {rel: _sha256(root / rel) for rel in files if not rel.endswith(".jpg")}
    manifest = {"version": WORLD_VERSION, "size": size, "seed": seed, "cloud_confusion": float(cloud_confusion),
                "files": files, "sha256": hashes}
    path = root / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=0))
    os.replace(tmp, path)
    return path


def check_world(root: Path, size: str, seed: int, cloud_confusion: float = FOGGY_SHAPES_CLOUD_CONFUSION) -> str:
    """Why the world at ``root`` cannot be used, or "" when it is complete and intact."""
    path = root / MANIFEST
    if not path.is_file():
        return "no manifest" if root.exists() else "not built"
    try:
        manifest = json.loads(path.read_text())
        files, hashes = dict(manifest["files"]), dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err.__class__.__name__})"
    if (manifest.get("version"), manifest.get("size"), manifest.get("seed"), manifest.get("cloud_confusion")) != \
            (WORLD_VERSION, size, seed, float(cloud_confusion)):
        return "manifest is for another version, size, seed or cloud_confusion"
    on_disk = {str(p.relative_to(root)): p.stat().st_size for p in _files(root)}
    if on_disk != files:
        missing = sorted(set(files) - set(on_disk)) or sorted(set(on_disk) ^ set(files))
        changed = [k for k in files if k in on_disk and on_disk[k] != files[k]]
        return f"files differ from the manifest (e.g. {(missing or changed)[0]})"
    bad = [rel for rel, digest in hashes.items() if _sha256(root / rel) != digest]
    return f"checksum mismatch in {bad[0]}" if bad else ""
