"""`simpleseg segment --batch` read by pycocotools: the COCO results file loads against the
dataset's own instances.json, COCOeval runs on it, and each result's RLE decodes (with
pycocotools) to the mask PNG the batch wrote, with its area and box."""

import json
import subprocess

import numpy as np
import pytest
from conftest import BIN

coco = pytest.importorskip("pycocotools.coco")
cocoeval = pytest.importorskip("pycocotools.cocoeval")
mask_utils = pytest.importorskip("pycocotools.mask")
Image = pytest.importorskip("PIL.Image")


def test_coco_results_load_and_match_the_masks(tmp_path):
    subprocess.run([str(BIN), "data", "synth", "--seed", "8", "--count", "10", "--out", "root"],
                   cwd=tmp_path, check=True, capture_output=True)
    instances = tmp_path / "root/synth/instances.json"
    gt_json = json.loads(instances.read_text())
    files = {im["id"]: im["file_name"] for im in gt_json["images"]}
    names = {c["id"]: c["name"] for c in gt_json["categories"]}
    with open(tmp_path / "items.jsonl", "w") as f:
        for ann in gt_json["annotations"]:
            f.write(json.dumps({"image": f"root/images/synth/{files[ann['image_id']]}",
                                "query": f"the {ann['color']} {names[ann['category_id']]}",
                                "id": f"ann{ann['id']}", "image_id": ann["image_id"],
                                "category_id": ann["category_id"]}) + "\n")
    subprocess.run([str(BIN), "segment", "--batch", "items.jsonl", "--out", "out", "--max-new-tokens", "64"],
                   cwd=tmp_path, check=True, capture_output=True)
    gt = coco.COCO(str(instances))
    dt = gt.loadRes(str(tmp_path / "out/coco_results.json"))
    assert len(dt.anns) == len(gt_json["annotations"])
    evaluation = cocoeval.COCOeval(gt, dt, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert len(evaluation.stats) == 12 and all(np.isfinite(evaluation.stats))
    results = json.loads((tmp_path / "out/coco_results.json").read_text())
    for r in results:
        decoded = mask_utils.decode(r["segmentation"])
        png = np.asarray(Image.open(tmp_path / f"out/masks/{r['id']}.png")) > 0
        assert (decoded.astype(bool) == png).all(), r["id"]
        assert int(mask_utils.area(r["segmentation"])) == r["area"]
        assert list(mask_utils.toBbox(r["segmentation"])) == r["bbox"]
