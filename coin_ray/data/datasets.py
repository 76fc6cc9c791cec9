"""Dataset readers: an unlabeled image folder, COCO JSON and Pascal VOC XML.

Every reader works on a local path or an ``s3://`` URI (through ``coin_ray.storage``).
Labelled readers return a ``LabelledSplit`` whose boxes are float32 xyxy in pixels and
whose labels index the run's category list (0..K-1), whatever ids the file used.
"""

from __future__ import annotations

import json
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from coin_ray import storage
from coin_ray.config import Config
from coin_ray.data.images import image_id_from_uri, read_image_record
from coin_ray.schema import ImageRecord


@dataclass
class GroundTruth:
    """Labelled boxes of one image: boxes (N, 4) float32 xyxy pixels, labels (N,) in [0, K).

    ``ignore`` (N,) bool marks boxes that neither count as misses nor as hits (VOC
    "difficult", COCO "iscrowd").
    """

    image_id: str
    uri: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray


@dataclass
class LabelledSplit:
    """A labelled split: the category names (index = label) and one GroundTruth per image."""

    categories: list[str]
    items: list[GroundTruth]
    skipped_labels: dict[str, int] = field(default_factory=dict)  # names not in categories

    def uris(self) -> list[str]:
        return [g.uri for g in self.items]


def list_image_folder(uri: str) -> list[str]:
    """Every file under a folder (recursive, hidden files skipped), sorted.

    Non-image files are listed too: reading them yields an error record with the reason,
    so nothing is silently dropped.
    """
    return storage.list_files(uri)


def read_image_folder(uri: str) -> Iterator[ImageRecord]:
    """Decode every file under ``uri``; unreadable files come out as error records."""
    for file_uri in list_image_folder(uri):
        yield read_image_record(file_uri, image_id_from_uri(file_uri, uri))


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _category_index(categories: list[str]) -> dict[str, int]:
    return {_normalise(c): i for i, c in enumerate(categories)}


def load_coco(annotations_uri: str, images_uri: str, categories: list[str]) -> LabelledSplit:
    """Read a COCO instances JSON; images are ``images_uri/file_name``.

    Category names are matched case- and underscore-insensitively to ``categories``;
    annotations of other categories are skipped and counted in ``skipped_labels``.
    """
    data = json.loads(storage.read_text(annotations_uri))
    index = _category_index(categories)
    id_to_label: dict[int, int] = {}
    id_to_name: dict[int, str] = {}
    for cat in data.get("categories", []):
        id_to_name[cat["id"]] = cat["name"]
        if _normalise(cat["name"]) in index:
            id_to_label[cat["id"]] = index[_normalise(cat["name"])]
    per_image: dict[int, list[dict]] = {}
    for ann in data.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
    skipped: dict[str, int] = {}
    items = []
    for img in data.get("images", []):
        boxes, labels, ignore = [], [], []
        for ann in per_image.get(img["id"], []):
            if ann["category_id"] not in id_to_label:
                name = id_to_name.get(ann["category_id"], str(ann["category_id"]))
                skipped[name] = skipped.get(name, 0) + 1
                continue
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(id_to_label[ann["category_id"]])
            ignore.append(bool(ann.get("iscrowd", 0)))
        file_name = img["file_name"]
        items.append(GroundTruth(
            image_id=file_name.rsplit(".", 1)[0], uri=storage.join(images_uri, file_name),
            width=int(img["width"]), height=int(img["height"]),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int64), ignore=np.asarray(ignore, bool)))
    return LabelledSplit(list(categories), items, skipped)


def parse_voc_xml(text: str) -> tuple[str, int, int, list[tuple[str, list[float], bool]]]:
    """Parse one VOC annotation: (filename, width, height, [(name, xyxy, difficult)]).

    VOC pixel coordinates are 1-based and inclusive; they are returned as 0-based xyxy
    (x1 - 1, y1 - 1, x2, y2), the usual conversion.
    """
    root = ET.fromstring(text)
    filename = (root.findtext("filename") or "").strip()
    size = root.find("size")
    width = int(float(size.findtext("width"))) if size is not None else 0
    height = int(float(size.findtext("height"))) if size is not None else 0
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append(((obj.findtext("name") or "").strip(), [x1 - 1, y1 - 1, x2, y2], difficult))
    return filename, width, height, objects


def load_voc(root_uri: str, categories: list[str], split: str | None = None) -> LabelledSplit:
    """Read a Pascal VOC layout: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.

    With ``split`` None every XML under Annotations is read.
    """
    ann_dir = storage.join(root_uri, "Annotations")
    if split:
        ids_text = storage.read_text(storage.join(root_uri, "ImageSets", "Main", f"{split}.txt"))
        xml_uris = [storage.join(ann_dir, f"{line.split()[0]}.xml") for line in ids_text.splitlines() if line.strip()]
    else:
        xml_uris = storage.list_files(ann_dir, (".xml",))
    index = _category_index(categories)
    skipped: dict[str, int] = {}
    items = []
    for xml_uri in xml_uris:
        filename, width, height, objects = parse_voc_xml(storage.read_text(xml_uri))
        stem = posixpath.basename(xml_uri).rsplit(".", 1)[0]
        filename = filename or f"{stem}.jpg"
        boxes, labels, ignore = [], [], []
        for name, box, difficult in objects:
            if _normalise(name) not in index:
                skipped[name] = skipped.get(name, 0) + 1
                continue
            boxes.append(box)
            labels.append(index[_normalise(name)])
            ignore.append(difficult)
        items.append(GroundTruth(
            image_id=stem, uri=storage.join(root_uri, "JPEGImages", filename), width=width, height=height,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int64), ignore=np.asarray(ignore, bool)))
    return LabelledSplit(list(categories), items, skipped)


def load_labelled(fmt: str, annotations_uri: str, images_uri: str, categories: list[str]) -> LabelledSplit:
    """Dispatch on ``fmt`` ("coco" or "voc"); for VOC ``annotations_uri`` is the VOC root and
    ``images_uri`` may name the split ("val") or be empty."""
    if fmt == "coco":
        return load_coco(annotations_uri, images_uri, categories)
    if fmt == "voc":
        return load_voc(annotations_uri, categories, split=images_uri or None)
    raise ValueError(f"data.val_format: {fmt!r} is not supported (allowed: coco, voc)")


def target_uris(cfg: Config) -> list[str]:
    """The unlabeled target images (capped by ``data.max_images``), sorted."""
    uris = list_image_folder(cfg.data.target_images)
    return uris[: cfg.data.max_images] if cfg.data.max_images else uris


def val_split(cfg: Config) -> LabelledSplit | None:
    """The labelled target split used for the metric, or None when the user has none."""
    if not cfg.data.val_annotations:
        return None
    return load_labelled(cfg.data.val_format, cfg.data.val_annotations, cfg.data.val_images,
                         cfg.data.categories)
