"""The wheel against the fixtures pycocotools and OpenCV produced (fixtures/, the same the Rust
tests use): 0 mismatches."""

import json
from pathlib import Path

import numpy as np
import simpleseg

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"


def cases(name):
    return json.loads((FIXTURES / name).read_text())["cases"]


def test_answers_decode_to_pycocotools_masks():
    for c in cases("answers.json"):
        rle = simpleseg.answer_to_rle(c["answer"], c["width"], c["height"], mode="official")
        assert rle == c["mask"], c["answer"][:80]
        mask = simpleseg.answer_to_mask(c["answer"], c["width"], c["height"])
        assert mask.shape == (c["height"], c["width"]) and mask.dtype == np.uint8
        assert int(mask.sum()) == simpleseg.rle_area(c["mask"])


def test_polygons_rasterize_as_pycocotools():
    for c in cases("raster.json"):
        xy = c["xy"]
        answer = "[[" + ", ".join(f"[{x!r}, {y!r}]" for x, y in zip(xy[::2], xy[1::2])) + "]]"
        rle = simpleseg.answer_to_rle(answer, c["w"], c["h"], mode="robust", coords="pixels")
        assert rle["counts"] == c["counts"], c["kind"]
        assert simpleseg.rle_area(rle) == c["area"]
        assert simpleseg.rle_bbox(rle) == c["bbox"]


def test_targets_match_the_data_script():
    for c in cases("contours.json"):
        mask = simpleseg.rle_decode(c["mask"])
        assert simpleseg.mask_to_target(mask) == c["target"], c["name"]
        for ratio, target in c.get("targets_by_ratio", {}).items():
            assert simpleseg.mask_to_target(mask, epsilon_ratio=float(ratio)) == target, (c["name"], ratio)
        # The same mask as bool, and as a non-contiguous view: same answer.
        assert simpleseg.mask_to_target(mask.astype(bool)) == c["target"]
        assert simpleseg.mask_to_target(np.asfortranarray(mask)) == c["target"]


def test_rle_operations_match_pycocotools():
    for c in cases("rle_ops.json"):
        rles = c["rles"]
        for text, rle, area, bbox in zip(c["masks_row_major"], rles, c["areas"], c["bboxes"]):
            h, w = rle["size"]
            mask = np.frombuffer(text.encode(), dtype=np.uint8).reshape(h, w) - ord("0")
            assert simpleseg.rle_encode(mask) == rle
            assert np.array_equal(simpleseg.rle_decode(rle), mask)
            assert simpleseg.rle_area(rle) == area
            assert simpleseg.rle_bbox(rle) == bbox
        assert simpleseg.rle_merge(rles) == c["union"]
        assert simpleseg.rle_iou(rles[0], rles[-1]) == c["iou_first_last"]
