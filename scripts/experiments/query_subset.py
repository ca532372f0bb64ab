#!/usr/bin/env python3
"""Selects training records by query kind and object count.

    python3 scripts/experiments/query_subset.py ROOT DATA.jsonl KINDS MIN_OBJECTS > SUBSET.jsonl

DATA.jsonl is `simpleseg data sft` output, of which the point questions ("Point to EXPRESSION in
the image.") are considered, or `simpleseg data rl` output, of which every record is ("Output
the polygon coordinates of EXPRESSION in the image."). A record is kept when EXPRESSION's kind
(scripts/experiments/synth_error_breakdown.py's query_kind: "colour only", "shape only", "colour + shape",
"relation", "extreme (...)"; KINDS is a comma-separated list of kinds or prefixes, or "all") is
wanted and the image (of a `simpleseg data synth` folder ROOT) holds at least MIN_OBJECTS
objects. Used to build the curricula of the model card. Standard library only.
"""

import collections
import json
import re
import sys
from pathlib import Path

from synth_error_breakdown import query_kind

SFT_POINT = re.compile(r"^<img>(.*?)</img>Point to (.*) in the image\.$")
RL_POLYGON = re.compile(r"^Output the polygon coordinates of (.*) in the image\.$")


def image_and_expression(record):
    """(image path, expression) of a record, or None for a record that is not considered."""
    if "conversations" in record:
        match = SFT_POINT.match(record["conversations"][0]["value"])
        return match and (match.group(1), match.group(2))
    match = RL_POLYGON.match(record["prompt"])
    if not match:
        sys.exit(f"unexpected RL prompt: {record['prompt']!r}")
    return record["image"], match.group(1)


def main(root, data, kinds, min_objects):
    instances = json.loads((root / "synth" / "instances.json").read_text())
    by_file = {i["file_name"]: i["id"] for i in instances["images"]}
    count = collections.Counter(a["image_id"] for a in instances["annotations"])
    kept = 0
    with open(data) as f:
        for line in f:
            found = image_and_expression(json.loads(line))
            if not found:
                continue
            image = by_file.get(Path(found[0]).name)
            kind = query_kind(found[1])
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
