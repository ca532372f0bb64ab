#!/usr/bin/env python3
"""Builds SFT targets for a folder of masks with Ray Data, each batch computed by the simpleseg
wheel (`pip install crates/simpleseg-py ray`): one JSON line per mask, {"mask", "target"}.

    python examples/ray_build_targets.py --masks data/masks --out targets.jsonl
    python examples/ray_build_targets.py --masks data/masks --out targets.jsonl --address auto   # a cluster

Masks are PNG files; any non-zero pixel is foreground (as `simpleseg target --mask`).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import ray
from PIL import Image

import simpleseg


def targets(batch, epsilon_ratio):
    """Ray `map_batches` function: mask paths in, target strings out."""
    out = []
    for path in batch["mask"]:
        mask = (np.asarray(Image.open(path)) != 0)
        if mask.ndim == 3:
            mask = mask.any(axis=2)
        out.append(simpleseg.mask_to_target(mask, epsilon_ratio=epsilon_ratio))
    return {"mask": batch["mask"], "target": np.array(out, dtype=object)}


def build(masks, epsilon_ratio=0.001, batch_size=64):
    """(mask path, target) pairs for every PNG under `masks`, in path order."""
    paths = sorted(str(p) for p in Path(masks).rglob("*.png"))
    ds = ray.data.from_items([{"mask": p} for p in paths])
    ds = ds.map_batches(targets, fn_kwargs={"epsilon_ratio": epsilon_ratio}, batch_size=batch_size,
                        batch_format="numpy")
    return sorted((row["mask"], row["target"]) for row in ds.iter_rows())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epsilon-ratio", type=float, default=0.001)
    ap.add_argument("--address", default=None, help="a Ray cluster (default: a local one)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    args = ap.parse_args()
    ray.init(address=args.address, num_cpus=None if args.address else args.num_cpus, include_dashboard=False)
    rows = build(args.masks, args.epsilon_ratio)
    with args.out.open("w") as f:
        for mask, target in rows:
            f.write(json.dumps({"mask": mask, "target": target}) + "\n")
    print(f"{len(rows)} targets -> {args.out}")


if __name__ == "__main__":
    main()
