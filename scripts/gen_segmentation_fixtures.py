#!/usr/bin/env python3
"""Regenerates fixtures/data/coco_segmentations.json: COCO `segmentation` lists as pycocotools
2.0.11 turns them into masks (`frPyObjects` + `merge`, what COCO.annToRLE and the refer API
do), including the shapes it reads unexpectedly: short or odd-length polygons after the first
are rasterized from their whole points (frPoly), and the shapes it raises on are recorded as
errors (a first entry of 4 numbers takes its box branch, which raises on a list).

    .venv/bin/python scripts/gen_segmentation_fixtures.py      (requirements-fixtures.txt)
"""

import json
from pathlib import Path

import pycocotools.mask as mask_utils

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "data" / "coco_segmentations.json"

CASES = [
    ("one box", [[10.5, 5.2, 20.3, 12.7]], 30, 40),
    ("two boxes", [[0, 0, 5, 5], [10, 10, 3.5, 3.5]], 30, 40),
    ("box partly outside", [[-3.2, -2.0, 10.0, 8.4]], 30, 40),
    ("zero-size box", [[4, 4, 0, 0]], 30, 40),
    ("polygon then a 4-number polygon", [[1, 1, 30, 1, 30, 20, 1, 20], [20, 20, 25, 25]], 30, 40),
    ("polygon then a 2-number polygon", [[1, 1, 30, 1, 30, 20], [5, 5]], 30, 40),
    ("odd-length polygon", [[1.5, 1, 30, 1.5, 30, 20, 1]], 30, 40),
    ("first of 5 numbers", [[1, 1, 30, 1, 30]], 30, 40),
    ("polygon", [[2.3, 3.1, 35.5, 4.0, 20.2, 27.9]], 30, 40),
    ("first of 3 numbers", [[1, 2, 3]], 30, 40),
    ("boxes then a polygon", [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]], 30, 40),
    ("no polygon", [], 30, 40),
]


def main():
    cases = []
    for name, segmentation, h, w in CASES:
        case = {"name": name, "segmentation": segmentation, "height": h, "width": w}
        try:
            rles = mask_utils.frPyObjects(segmentation, h, w)
            rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
            case["rle"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        except Exception as e:  # pycocotools raises several types here
            case["error"] = f"{type(e).__name__}: {e}"
        cases.append(case)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
