#!/usr/bin/env python3
"""Selects point questions from `simpleseg data sft` output by query kind and object count.

    python3 scripts/sft_subset.py ROOT SFT.jsonl KINDS MIN_OBJECTS > SUBSET.jsonl

Keeps the records whose question is "Point to EXPRESSION in the image." where EXPRESSION's kind
(scripts/synth_error_breakdown.py's query_kind: "colour only", "shape only", "colour + shape",
"relation", "extreme (...)"; KINDS is a comma-separated list of kinds or prefixes, or "all") is
wanted and the image (of a `simpleseg data synth` folder ROOT) holds at least MIN_OBJECTS
objects. Used to build the selection curriculum of the model card. Standard library only.
"""

import collections
import json
import re
import sys
from pathlib import Path

from synth_error_breakdown import query_kind

POINT = re.compile(r"^<img>(.*?)</img>Point to (.*) in the image\.$")


def main(root, data, kinds, min_objects):
    instances = json.loads((root / "synth" / "instances.json").read_text())
    by_file = {i["file_name"]: i["id"] for i in instances["images"]}
    count = collections.Counter(a["image_id"] for a in instances["annotations"])
    kept = 0
    with open(data) as f:
        for line in f:
            record = json.loads(line)
            match = POINT.match(record["conversations"][0]["value"])
            if not match:
                continue
            image = by_file.get(Path(match.group(1)).name)
            kind = query_kind(match.group(2))
            if image is None or count[image] < min_objects:
                continue
            if kinds != ["all"] and not any(kind.startswith(k) for k in kinds):
                continue
            sys.stdout.write(line)
            kept += 1
    print(f"kept {kept} records", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]))
