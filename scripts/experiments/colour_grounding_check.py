#!/usr/bin/env python3
"""Does a model pick the object a colour-only (or other) query names?

    python3 scripts/experiments/colour_grounding_check.py ROOT MODEL [LIMIT [SPLIT [KIND]]]

For each colour-only query ("the red shape"; or each query of KIND, a kind from
`synth_error_breakdown.query_kind` such as "shape only") in a scene of SPLIT (default val) of a
`simpleseg data synth` folder with several objects (the first LIMIT of them; 0: all), asks
MODEL (with `simpleseg chat`, greedy) to "Point to {query} in the image." and counts how often
the answered point falls on the named object (the object whose box holds the point, else the
nearest box centre), against the rate of picking an object at random. A short answer whose only
content is the choice of object: the purest test of whether the model reads the query's words.
Needs only the Python standard library and a built `simpleseg` (target/release/simpleseg, or the
path in $SIMPLESEG).
"""

import collections
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

from synth_error_breakdown import query_kind


def main(root, model, limit, split, kind):
    here = Path(__file__).resolve().parents[2]
    binary = os.environ.get("SIMPLESEG", str(here / "target" / "release" / "simpleseg"))
    instances = json.loads((root / "synth" / "instances.json").read_text())
    images = {i["id"]: i for i in instances["images"]}
    objects = collections.defaultdict(list)
    for a in instances["annotations"]:
        objects[a["image_id"]].append(a)
    with open(root / "synth" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    right = asked = 0
    chance = 0.0
    for ref in refs:
        anns = objects[ref["image_id"]]
        if ref["split"] != split or len(anns) < 2:
            continue
        for sentence in ref["sentences"]:
            if query_kind(sentence["sent"]) != kind:
                continue
            image = images[ref["image_id"]]
            answer = subprocess.run(
                [binary, "chat", "--model", str(model), "--greedy",
                 "--image", str(root / "images" / "synth" / image["file_name"]),
                 "--prompt", f"Point to {sentence['sent']} in the image."],
                capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": "1"},
            ).stdout
            asked += 1
            chance += 1 / len(anns)
            point = re.search(r"\[([0-9.]+), ([0-9.]+)\]", answer)
            if point:
                x = float(point.group(1)) * image["width"]
                y = float(point.group(2)) * image["height"]

                def distance(a):
                    bx, by, bw, bh = a["bbox"]
                    inside = bx <= x <= bx + bw and by <= y <= by + bh
                    return (not inside, (bx + bw / 2 - x) ** 2 + (by + bh / 2 - y) ** 2)

                right += min(anns, key=distance)["id"] == ref["ann_id"]
            if limit and asked == limit:
                break
        if limit and asked == limit:
            break
    print(f"{model}: {kind} queries in {split} scenes with several objects: "
          f"the point is on the named object {right}/{asked} = {right / asked:.2f} "
          f"(an object at random: {chance / asked:.2f})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5, 6):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]),
         int(sys.argv[3]) if len(sys.argv) > 3 else 0,
         sys.argv[4] if len(sys.argv) > 4 else "val",
         sys.argv[5] if len(sys.argv) > 5 else "colour only")
