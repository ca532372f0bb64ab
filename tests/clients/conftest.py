"""Starts `simpleseg serve` (the built-in model) on a free loopback port for the client tests."""

import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SIMPLESEG_BIN", ROOT / "target/release/simpleseg"))
DEMO = ROOT / "examples/synth/images/synth/demo_0000008.png"


def start_server(*extra):
    """Runs the server on port 0; returns (process, base URL) once /health answers 200."""
    proc = subprocess.Popen([str(BIN), "serve", "--port", "0", *extra], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    match = re.search(r"http://([0-9.:]+)", line)
    assert match, f"no address in {line!r}"
    base = f"http://{match.group(1)}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


@pytest.fixture(scope="session")
def server():
    proc, base = start_server()
    yield base, proc
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="session")
def demo_image():
    return DEMO
