#!/usr/bin/env python3
"""What hostile requests cost `simpleseg serve`: for each case of the server-hardening issue,
a fresh server (the built-in model) under an address-space limit gets the request; the script
reports the answer's status, the wall time, and the server's peak resident memory (VmHWM), or
that the server died. `--old-bin` runs the same cases against a second binary in the same run
(an earlier build), for before/after tables.

    python3 scripts/bench/bench_hardening.py --bin target/release/simpleseg --old-bin /tmp/old/simpleseg

The rasterizer case runs `decode` on 320,000 triangles at 1000x800 and 4000x3000 (time and
peak memory of the command, from getrusage).
"""

import argparse
import base64
import json
import os
import re
import resource
import subprocess
import tempfile
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples/synth/images/synth/demo_0000008.png"


def limit(address_space):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return apply


def start(binary, address_space, *extra):
    proc = subprocess.Popen([binary, "serve", "--port", "0", *extra], stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit(address_space), env={**os.environ, "SIMPLESEG_CACHE": tempfile.gettempdir() + "/bench-hardening-cache"})
    line = proc.stderr.readline()
    match = re.search(r"http://([0-9.:]+)", line)
    if not match:
        raise RuntimeError(f"no address in {line!r}")
    base = f"http://{match.group(1)}"
    threading.Thread(target=proc.stderr.read, daemon=True).start()
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


def post(base, path, body, timeout=600):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except OSError:
        return "no answer"


def peak_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return None


def huge_png(side=13000):
    row = b"\x00" * (side + 1)
    compressor = zlib.compressobj(1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", data) + chunk(b"IEND", b"")


def ordinary():
    """The README's request: the red shape in the demo image."""
    image = "data:image/png;base64," + base64.b64encode(DEMO.read_bytes()).decode()
    return {"image": image, "query": "the red shape", "temperature": 0, "max_tokens": 24}


def cases():
    seg = ordinary()
    image = seg["image"]

    def chat(extra, text="the red shape"):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                         {"type": "text", "text": text}]}],
                "temperature": 0, "max_tokens": 16, **extra}

    def recursive(n):
        return {"type": "json_schema", "json_schema": {"name": "n", "schema": {"$defs": {"n": {
            "type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/n"} for i in range(n)}}}, "$ref": "#/$defs/n"}}}

    big = "data:image/png;base64," + base64.b64encode(huge_png()).decode()
    return [
        ("C1 recursive schema, 3 properties", "/v1/chat/completions", chat({"response_format": recursive(3)}), 1),
        ("C1 recursive schema, 4 properties", "/v1/chat/completions", chat({"response_format": recursive(4)}), 1),
        ("C1 25 MB regex", "/v1/chat/completions", chat({"response_format": {"type": "regex", "regex": "a" * (25 << 20)}}), 1),
        ("C2 min/max_pixels 4,000,000", "/v1/segment", {**seg, "min_pixels": 4_000_000, "max_pixels": 4_000_000}, 1),
        ("C3 8,000-token chat", "/v1/chat/completions", chat({}, "one " * 8000), 1),
        ("C3 {query} x 100,000", "/v1/segment", {**seg, "prompt_template": "{query}" * 100_000}, 1),
        ("C3 max_tokens 20,000", "/v1/segment", {**seg, "max_tokens": 20_000}, 1),
        ("H1 16 x 13000x13000 PNG, --queue 8", "/v1/segment", {**seg, "image": big}, 16),
        ("M1 12 MB stop list, n 16", "/v1/chat/completions", chat({"stop": ["x" * 3000] * 4000, "n": 16, "max_tokens": 64}), 1),
        ("M2 20 x (a|b)*a(a|b){30}", "/v1/chat/completions",
         chat({"response_format": {"type": "regex", "regex": "(a|b)*a(a|b){30}"}}), 20),
    ]


def run_case(binary, address_space, name, path, body, parallel):
    proc, base = start(binary, address_space, *(["--queue", "8"] if name.startswith("H1") else []))
    statuses = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda: statuses.append(post(base, path, body))) for _ in range(parallel)]
    for t in threads:
        t.start()
    # An ordinary request sent with the hostile ones: how long it waits.
    probe = {}
    if name.startswith("M2"):
        time.sleep(0.2)
        p0 = time.monotonic()
        probe["status"] = post(base, "/v1/segment", ordinary())
        probe["seconds"] = round(time.monotonic() - p0, 2)
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    rss = peak_rss_mib(proc.pid)
    alive = rss is not None and proc.poll() is None
    proc.kill()
    proc.wait()
    summary = {}
    for s in statuses:
        summary[str(s)] = summary.get(str(s), 0) + 1
    return {"case": name, "statuses": summary, "seconds": round(wall, 2), "peak_rss_mib": rss,
            "server_alive": alive, **({"ordinary_request": probe} if probe else {})}


def rasterize(binary, address_space):
    rows = []
    with tempfile.TemporaryDirectory() as d:
        parts = []
        for i in range(320_000):
            x, y = (i * 7919 % 997) / 1000, (i * 104_729 % 991) / 1000
            parts.append(f"[[{x:.3f}, {y:.3f}], [{x + 0.002:.3f}, {y:.3f}], [{x:.3f}, {y + 0.003:.3f}]]")
        answer = Path(d) / "triangles.txt"
        answer.write_text("[" + ", ".join(parts) + "]")
        for w, h in [(1000, 800), (4000, 3000)]:
            t0 = time.monotonic()
            proc = subprocess.Popen([binary, "decode", "--response-file", str(answer), "--width", str(w),
                                     "--height", str(h), "--rle-out", str(Path(d) / "t.json")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limit(address_space))
            _, status, usage = os.wait4(proc.pid, 0)
            rows.append({"case": f"H2 320,000 triangles at {w}x{h}", "seconds": round(time.monotonic() - t0, 2),
                         "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit": os.waitstatus_to_exitcode(status)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/release/simpleseg"))
    ap.add_argument("--old-bin", help="a second binary to run the same cases against")
    ap.add_argument("--address-space-gib", type=float, default=8)
    args = ap.parse_args()
    address_space = int(args.address_space_gib * (1 << 30))
    binaries = [("new", args.bin)] + ([("old", args.old_bin)] if args.old_bin else [])
    cpu = [l for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if "Model name" in l]
    print(json.dumps({"cpu": cpu[0].split(":", 1)[1].strip() if cpu else "?", "address_space_gib": args.address_space_gib}))
    for label, binary in binaries:
        for name, path, body, parallel in cases():
            row = run_case(binary, address_space, name, path, body, parallel)
            print(json.dumps({"binary": label, **row}), flush=True)
        for row in rasterize(binary, address_space):
            print(json.dumps({"binary": label, **row}), flush=True)


if __name__ == "__main__":
    main()
