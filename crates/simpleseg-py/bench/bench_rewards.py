#!/usr/bin/env python3
"""IoU rewards of 10,000 answers: the wheel (one thread, all cores) against the Python
reference (the official decoder's regular expression and json.loads, pycocotools frPyObjects +
merge + iou), in one run; checks the rewards are equal.

    pip install crates/simpleseg-py pycocotools numpy
    python crates/simpleseg-py/bench/bench_rewards.py --answers 10000
"""

import argparse
import json
import os
import re
import time

import numpy as np
from pycocotools import mask as mask_utils

import simpleseg

NUMBER = r"(?:[1-9]\d*\.\d+|0\.\d+|\d+)"
POLYGON = re.compile(rf"\[\s*(\[\s*{NUMBER}\s*,\s*{NUMBER}\s*\](?:\s*,\s*\[\s*{NUMBER}\s*,\s*{NUMBER}\s*\])*)\s*\]")


def reference_reward(answer, gt, h, w):
    polys = []
    for m in POLYGON.finditer(answer):
        pts = json.loads("[" + m.group(1) + "]")
        if len(pts) >= 3:
            polys.append([c * s for x, y in pts for c, s in ((x, w), (y, h))])
    if not polys:
        return 0.0
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    return float(mask_utils.iou([rle], [gt], [0])[0][0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=10000)
    ap.add_argument("--points", type=int, default=24)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    h, w = 480, 640
    answers, gts = [], []
    for _ in range(args.answers):
        c = rng.uniform(0.2, 0.8, 2)
        ang = np.sort(rng.uniform(0, 2 * np.pi, args.points))
        r = rng.uniform(0.05, 0.2, args.points)
        pts = [[round(float(c[0] + ri * np.cos(a)), 3), round(float(c[1] + ri * np.sin(a)), 3)] for a, ri in zip(ang, r)]
        answers.append(json.dumps([pts]))
        gt = np.zeros((h, w), np.uint8, order="F")
        y0, x0 = (rng.uniform(0.1, 0.6, 2) * [h, w]).astype(int)
        gt[y0:y0 + 150, x0:x0 + 200] = 1
        gts.append(mask_utils.encode(gt))
    gt_dicts = [{"size": g["size"], "counts": g["counts"].decode()} for g in gts]

    t0 = time.perf_counter()
    ref = [reference_reward(a, g, h, w) for a, g in zip(answers, gts)]
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = simpleseg.iou_rewards(answers, gt_dicts, mode="official", threads=1)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    allc = simpleseg.iou_rewards(answers, gt_dicts, mode="official")
    t_all = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(ref, one))
    print(f"{args.answers} answers of {args.points} points at {w}x{h}, {os.cpu_count()} CPUs")
    print(f"| | seconds | ratio |\n|---|---|---|")
    print(f"| pycocotools + json (Python) | {t_ref:.2f} | 1.0x |")
    print(f"| simpleseg.iou_rewards, 1 thread | {t_one:.2f} | {t_ref / t_one:.1f}x |")
    print(f"| simpleseg.iou_rewards, all cores | {t_all:.2f} | {t_ref / t_all:.1f}x |")
    print(f"max |difference| {diff:.2e}; equal rewards: {one == allc}")
    assert diff < 1e-12


if __name__ == "__main__":
    main()
