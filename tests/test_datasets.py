import io
import json

import boto3
import numpy as np
import pytest
from PIL import Image

from coin_ray import storage
from coin_ray.data.datasets import load_coco, load_voc, read_image_folder
from coin_ray.data.images import ImageDecodeError, decode_image

CATS = ["car", "traffic light", "person"]


def _png(w=8, h=4, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _write_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_png())
    (root / "sub" / "b.png").write_bytes(_png(4, 6))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    (root / "trunc.png").write_bytes(_png()[:30])
    (root / ".hidden.png").write_bytes(_png())


def test_folder_reader_keeps_errors_as_records(tmp_path):
    _write_folder(tmp_path)
    records = {r.image_id: r for r in read_image_folder(str(tmp_path))}
    assert set(records) == {"a", "sub/b", "empty", "notes", "trunc"}
    assert records["a"].image.shape == (4, 8, 3) and records["a"].image.dtype == np.uint8
    assert records["sub/b"].image.shape == (6, 4, 3)
    assert "empty file" in records["empty"].error
    assert "not an image" in records["notes"].error
    assert records["trunc"].error.startswith(str(tmp_path / "trunc.png"))
    assert sum(1 for r in records.values() if r.error) == 3


def test_exif_orientation_is_applied_and_output_is_rgb():
    img = Image.new("L", (6, 2), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    arr = decode_image(buf.getvalue())
    assert arr.shape == (6, 2, 3)
    with pytest.raises(ImageDecodeError, match="x.bin: not an image"):
        decode_image(b"not an image at all", "x.bin")


def test_coco_reader_maps_names_and_skips_unknown(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "f/one.jpg", "width": 100, "height": 50}],
        "categories": [{"id": 3, "name": "Traffic_Light"}, {"id": 9, "name": "dog"}, {"id": 1, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [0, 0, 5, 5]},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 1},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    split = load_coco(str(path), str(tmp_path / "imgs"), CATS)
    (gt,) = split.items
    assert gt.uri == str(tmp_path / "imgs" / "f" / "one.jpg") and (gt.width, gt.height) == (100, 50)
    np.testing.assert_array_equal(gt.boxes, [[10, 5, 30, 15], [1, 2, 4, 6]])
    assert gt.labels.tolist() == [1, 0] and gt.ignore.tolist() == [False, True]
    assert split.skipped_labels == {"dog": 1}


VOC_XML = """<annotation><filename>000001.jpg</filename>
<size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>car</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object>
<object><name>person</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>
<object><name>boat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>
</annotation>"""


def test_voc_reader(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "Annotations" / "000001.xml").write_text(VOC_XML)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("000001\n")
    split = load_voc(str(tmp_path), CATS, split="val")
    (gt,) = split.items
    assert gt.image_id == "000001" and gt.uri.endswith("JPEGImages/000001.jpg")
    np.testing.assert_array_equal(gt.boxes, [[10, 5, 30, 20], [0, 0, 5, 9]])
    assert gt.labels.tolist() == [0, 2] and gt.ignore.tolist() == [False, True]
    assert split.skipped_labels == {"boat": 1}
    assert len(load_voc(str(tmp_path), CATS).items) == 1


def test_folder_and_coco_through_s3_on_a_loopback_server(tmp_path, s3_bucket, s3_endpoint):
    _write_folder(tmp_path / "imgs")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for f in (tmp_path / "imgs").rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=s3_bucket, Key="data/" + str(f.relative_to(tmp_path / "imgs")), Body=f.read_bytes())
    root = f"s3://{s3_bucket}/data"
    records = {r.image_id: r for r in read_image_folder(root)}
    assert set(records) == {"a", "sub/b", "empty", "notes", "trunc"}
    assert records["sub/b"].uri == f"s3://{s3_bucket}/data/sub/b.png"
    assert records["a"].image.shape == (4, 8, 3)
    assert "empty file" in records["empty"].error
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 4}],
            "categories": [{"id": 1, "name": "car"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}
    storage.write_text(f"{root}/ann.json", json.dumps(coco))
    split = load_coco(f"{root}/ann.json", root, CATS)
    assert split.items[0].uri == f"{root}/a.png"
    assert storage.read_bytes(split.items[0].uri) == (tmp_path / "imgs" / "a.png").read_bytes()
