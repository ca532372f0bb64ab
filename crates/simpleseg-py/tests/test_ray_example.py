"""examples/ray_build_targets.py with Ray in local mode gives `simpleseg target`'s targets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("SIMPLESEG_BIN", ROOT / "target/release/simpleseg"))


def test_ray_targets_equal_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        mask = np.zeros((40 + i, 50), np.uint8)
        y, x = rng.integers(0, 30, 2)
        mask[y:y + 8 + i, x:x + 15] = 255
        mask[rng.integers(0, 40):, rng.integers(0, 5)] = 255 * (i % 2)
        Image.fromarray(mask).save(tmp_path / f"m{i:02d}.png")
    # Run as a script, as users do: Ray pickles the batch function by value from __main__.
    out = tmp_path / "targets.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples/ray_build_targets.py"), "--masks", str(tmp_path),
                    "--out", str(out), "--num-cpus", "2"], check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        cli = subprocess.run([str(BIN), "target", "--mask", row["mask"]], check=True, capture_output=True,
                             text=True).stdout.strip()
        assert row["target"] == cli, row["mask"]
