"""Break a synth evaluation down by scene size and query kind.

Reads `simpleseg eval` predictions (OUT/predictions.jsonl) and the synth refer files, and prints
gIoU per number of objects in the scene and, for scenes with several objects, how often the
predicted box overlaps the named object most (did the model pick the right object?), per kind
of query. Needs only the Python standard library.

    python scripts/experiments/synth_error_breakdown.py ROOT OUT/predictions.jsonl
"""

import collections
import json
import pickle
import sys


def box_iou(xyxy, xywh):
    ax0, ay0, ax1, ay1 = xyxy
    bx0, by0, bw, bh = xywh
    iw = max(0.0, min(ax1, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + bw * bh - inter
    return inter / union if union > 0 else 0.0


def query_kind(sentence):
    words = sentence.split()
    if any(r in sentence for r in ("above", "below", "left of", "right of")):
        return "relation"
    if any(w.endswith("est") for w in words):
        return "extreme (" + " ".join(words[1:]) + ")"
    if len(words) == 2:
        return "shape only"
    if words[-1] == "shape":
        return "colour only"
    return "colour + shape"


def main(root, predictions):
    with open(f"{root}/synth/refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    with open(f"{root}/synth/instances.json") as f:
        instances = json.load(f)
    objects = collections.defaultdict(list)
    for ann in instances["annotations"]:
        objects[ann["image_id"]].append(ann)
    by_sentence = {s["sent_id"]: (r, s["sent"]) for r in refs for s in r["sentences"]}
    per_count = collections.defaultdict(list)
    picked = collections.defaultdict(lambda: [0, 0])
    chance = collections.defaultdict(float)
    with open(predictions) as f:
        for line in f:
            p = json.loads(line)
            ref, sentence = by_sentence[p["sent_id"]]
            anns = objects[ref["image_id"]]
            per_count[len(anns)].append(p["iou"])
            if len(anns) > 1 and p.get("pred_box"):
                overlaps = [box_iou(p["pred_box"], a["bbox"]) for a in anns]
                best = anns[max(range(len(anns)), key=overlaps.__getitem__)]
                for kind in ("all", query_kind(sentence)):
                    picked[kind][0] += 1
                    picked[kind][1] += best["id"] == ref["ann_id"]
                    chance[kind] += 1 / len(anns)
    for n, ious in sorted(per_count.items()):
        giou = 100 * sum(ious) / len(ious)
        print(f"{n} object(s): {len(ious)} expressions, gIoU {giou:.1f}")
    print("scenes with several objects: the answer's box overlaps the named object most")
    for kind, (n, right) in sorted(picked.items(), key=lambda kv: -kv[1][0]):
        guess = 100 * chance[kind] / n
        print(f"  {kind}: {100 * right / n:.0f}% of {n} (a random object: {guess:.0f}%)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
