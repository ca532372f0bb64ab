#!/usr/bin/env python3
"""Soak test on loopback: for a bounded time, several clients send ordinary requests while
others send what a hostile client would (recursive JSON schemas, huge pixel counts, long
prompts and stop lists, images that take hundreds of MB to decode, unknown fields, slow and
idle connections) to `simpleseg serve` running under an address-space limit (prlimit).

Reports the server's peak resident memory, the answers by status for each kind of request,
and the ordinary requests' success. Exits non-zero if the server died, an ordinary request
failed other than with a 429/503 telling it to retry, a hostile request was answered 200 or
5xx without Retry-After, or the ordinary answers differ from the same request served alone.

    python3 tests/clients/soak_test.py --seconds 30 --clients 3 --hostile 3
"""

import argparse
import base64
import collections
import json
import re
import resource
import socket
import subprocess
import sys
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

from conftest import BIN, DEMO

ADDRESS_SPACE = 4 << 30


def start(*extra):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    proc = subprocess.Popen([str(BIN), "serve", "--port", "0", *extra], stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit)
    line = proc.stderr.readline()
    match = re.search(r"http://([0-9.:]+)", line)
    assert match, f"no address in {line!r}"
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


def post(base, path, body, timeout=120):
    """(status, parsed body, Retry-After present)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read()), False
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text.decode(errors="replace")
        return e.code, parsed, e.headers.get("Retry-After") is not None


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def huge_png(side=9000):
    """A grey PNG of side x side pixels in a few hundred KB (it takes side^2 x 4 bytes to decode)."""
    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=3, help="clients sending ordinary requests")
    ap.add_argument("--hostile", type=int, default=3, help="clients sending hostile requests")
    args = ap.parse_args()
    proc, base = start("--queue", "8", "--max-connections", "64", "--header-timeout", "3",
                       "--image-memory", str(1 << 30))
    image = "data:image/png;base64," + base64.b64encode(DEMO.read_bytes()).decode()
    big = "data:image/png;base64," + base64.b64encode(huge_png()).decode()
    ordinary = {"image": image, "query": "the red shape", "temperature": 0, "max_tokens": 48}
    chat = lambda extra: {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "the red shape"}]}],
        "max_tokens": 16, **extra}
    recursive = {"$defs": {"n": {"type": "object", "properties": {
        f"p{i}": {"$ref": "#/$defs/n"} for i in range(4)}}}, "$ref": "#/$defs/n"}
    hostile = [
        ("recursive schema", "/v1/chat/completions", chat({"response_format": {"type": "json_schema",
                                                                                "json_schema": {"schema": recursive}}})),
        ("huge pixels", "/v1/segment", {**ordinary, "min_pixels": 6_000_000, "max_pixels": 6_000_000}),
        ("repeated query", "/v1/segment", {**ordinary, "prompt_template": "{query}" * 100_000}),
        ("long answer", "/v1/segment", {**ordinary, "max_tokens": 20_000}),
        ("stop list", "/v1/chat/completions", chat({"stop": ["x" * 200] * 64})),
        ("big regex", "/v1/chat/completions", chat({"response_format": {"type": "regex", "regex": "(a|b)*a(a|b){30}"}})),
        ("tiny temperature", "/v1/chat/completions", chat({"temperature": 1e-300})),
        ("unknown field", "/v1/chat/completions", chat({"best_of": 4})),
        ("large image", "/v1/segment", {**ordinary, "image": big}),
    ]
    statuses = collections.defaultdict(collections.Counter)
    problems = []
    lock = threading.Lock()
    try:
        reference = post(base, "/v1/segment", ordinary)[1]["answer"]
        stop = time.monotonic() + args.seconds

        def record(kind, status, ok, note):
            with lock:
                statuses[kind][status] += 1
                if not ok:
                    problems.append((kind, status, note))

        def normal_client():
            while time.monotonic() < stop:
                try:
                    status, out, retry = post(base, "/v1/segment", ordinary)
                except OSError as e:
                    record("ordinary", "error", False, repr(e))
                    continue
                if status == 200:
                    record("ordinary", status, out["answer"] == reference, out.get("answer"))
                else:
                    record("ordinary", status, status in (429, 503) and retry, out)
                    time.sleep(0.2)

        def hostile_client(k):
            i = k
            while time.monotonic() < stop:
                name, path, body = hostile[i % len(hostile)]
                i += 1
                try:
                    status, out, retry = post(base, path, body)
                except OSError as e:
                    record(name, "error", False, repr(e))
                    continue
                # A big image may be served when the budget allows; everything else is refused.
                ok = (400 <= status < 500 and status != 429) or (status in (429, 503) and retry) or \
                     (status == 200 and name == "large image")
                record(name, status, ok, out)

        def slow_client():
            """Opens connections that trickle their headers or stay idle."""
            host, port = base[len("http://"):].rsplit(":", 1)
            while time.monotonic() < stop:
                conns = []
                for _ in range(16):
                    try:
                        s = socket.create_connection((host, int(port)))
                        s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: localhost\r\n")
                        conns.append(s)
                    except OSError:
                        pass
                time.sleep(4)
                for s in conns:
                    s.close()
                with lock:
                    statuses["slow connections"]["opened"] += len(conns)

        threads = [threading.Thread(target=normal_client) for _ in range(args.clients)]
        threads += [threading.Thread(target=hostile_client, args=(k,)) for k in range(args.hostile)]
        threads.append(threading.Thread(target=slow_client))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        alive = proc.poll() is None
        final = post(base, "/v1/segment", ordinary)[0] if alive else None
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    report = {
        "seconds": round(wall, 1),
        "address_space_limit_gib": ADDRESS_SPACE >> 30,
        "server_peak_rss_mib": round(rss, 1),
        "server_alive": alive,
        "ordinary_after": final,
        "statuses": {k: dict(v) for k, v in statuses.items()},
        "problems": len(problems),
    }
    print(json.dumps(report, indent=2, default=str))
    ordinary_ok = statuses["ordinary"][200]
    if not alive or final != 200 or problems or ordinary_ok == 0:
        print("problems:", problems[:5], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
