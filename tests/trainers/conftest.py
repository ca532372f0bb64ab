"""The trainers' own code reading simpleseg's data and rewards: verl's RLHF dataset and reward
managers, TRL's GRPOTrainer, and the `datasets` library on the SFT formats. These need torch,
transformers, datasets, trl and verl (`.ci/run` installs them in their own venv)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SIMPLESEG_BIN", ROOT / "target/release/simpleseg"))


def simpleseg(*args, cwd):
    return subprocess.run([str(BIN), *map(str, args)], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A synthetic referring set, its SFT data in every format, RL data for verl, and the
    built-in model as a Hugging Face folder (transformers loads it)."""
    root = tmp_path_factory.mktemp("trainers")
    simpleseg("data", "synth", "--seed", "12", "--count", "8", "--out", "root", cwd=root)
    for fmt in ("simpleseg", "llamafactory", "trl"):
        simpleseg("data", "sft", "--refer-root", "root", "--datasets", "synth", "--passes", "1",
                  "--format", fmt, "--out", f"sft-{fmt}.json", cwd=root)
    simpleseg("data", "rl", "--refer-root", "root", "--datasets", "synth", "--out", "rl.jsonl", cwd=root)
    simpleseg("data", "rl", "--refer-root", "root", "--datasets", "synth", "--format", "verl",
              "--out", "rl.parquet", cwd=root)
    simpleseg("export-model", "--out", "model", cwd=root)
    return root
