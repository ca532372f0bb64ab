#!/usr/bin/env python3
"""Load test on loopback: N concurrent clients send /v1/segment and chat requests to
`simpleseg serve` for a fixed time, then stop. Reports latency percentiles, throughput, errors,
answers that differ from the same request served alone (greedy: they must not), and the
server's peak resident memory. Exits non-zero if a request was lost or corrupted.

    python3 tests/clients/load_test.py --clients 8 --seconds 30
"""

import argparse
import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.request

from conftest import DEMO, start_server

QUERIES = ["the red shape", "the blue shape", "the green shape", "the biggest shape"]


def post(base, path, body, timeout=300):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    proc, base = start_server("--max-batch", "16", "--queue", "256")
    image = "data:image/png;base64," + base64.b64encode(DEMO.read_bytes()).decode()
    bodies = [{"image": image, "query": q, "temperature": 0, "max_tokens": args.max_tokens} for q in QUERIES]
    try:
        # Each request alone first: the reference answers.
        reference = [post(base, "/v1/segment", b)[1]["answer"] for b in bodies]
        latencies, wrong, failed = [], [], []
        lock = threading.Lock()
        stop = time.monotonic() + args.seconds

        def client(k):
            i = k
            while time.monotonic() < stop:
                body = bodies[i % len(bodies)]
                t0 = time.monotonic()
                try:
                    status, out = post(base, "/v1/segment", body)
                    ok = status == 200 and out["answer"] == reference[i % len(bodies)]
                    with lock:
                        latencies.append(time.monotonic() - t0)
                        if not ok:
                            wrong.append((status, out.get("answer")))
                except (urllib.error.URLError, OSError, ValueError) as e:
                    with lock:
                        failed.append(repr(e))
                i += 1

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")
    report = {
        "clients": args.clients, "seconds": round(wall, 1), "requests": len(latencies),
        "throughput_per_s": round(len(latencies) / wall, 2),
        "latency_s": {"p50": round(pct(50), 3), "p90": round(pct(90), 3), "p99": round(pct(99), 3),
                      "max": round(latencies[-1], 3) if latencies else None},
        "wrong_answers": len(wrong), "failed_requests": len(failed), "server_peak_rss_mib": round(rss, 1),
    }
    print(json.dumps(report, indent=2))
    if wrong or failed or not latencies:
        print("lost or corrupted requests:", wrong[:3], failed[:3], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
