#!/usr/bin/env python3
"""End-to-end propagation through real agents: a change on agent 0's API
(a TTL check flip) -> visible on every other agent's API. Each watcher
holds a blocking query (?index=&wait=) on /v1/health/service/web and
records when it returns with the new status.

Usage: propagation.py CHANGES API_ADDR [API_ADDR ...]  (first = publisher)
Loopback addresses only; bounded: each change waits at most 10 s."""
import json
import sys
import threading
import time
import urllib.request


def get(addr, path, timeout=15):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
        return int(r.headers.get("X-Consul-Index", "0")), json.load(r)


def put(addr, path):
    req = urllib.request.Request(f"http://{addr}{path}", method="PUT", data=b"")
    urllib.request.urlopen(req, timeout=5).read()


def status_on(body, node):
    for entry in body:
        if entry["Node"]["Node"] == node:
            for c in entry["Checks"]:
                if c["ServiceID"] == "web-1":
                    return c["Status"]
    return None


def main():
    changes = int(sys.argv[1])
    publisher, watchers = sys.argv[2], sys.argv[3:]
    _, me = get(publisher, "/v1/agent/self")
    node = me["Config"]["NodeName"]
    latencies = []
    lock = threading.Lock()
    for n in range(changes):
        want = "critical" if n % 2 == 0 else "passing"
        verb = "fail" if want == "critical" else "pass"
        start = {"t": None}
        ready = threading.Barrier(len(watchers) + 1)

        def watch(addr):
            index, body = get(addr, "/v1/health/service/web")
            ready.wait()
            deadline = time.time() + 10
            while status_on(body, node) != want and time.time() < deadline:
                index, body = get(addr, f"/v1/health/service/web?index={index}&wait=10s")
            seen = time.time()
            if status_on(body, node) == want:
                with lock:
                    latencies.append(seen - start["t"])

        threads = [threading.Thread(target=watch, args=(a,)) for a in watchers]
        for t in threads:
            t.start()
        ready.wait()
        time.sleep(0.05)  # every watcher is now blocked in its query
        start["t"] = time.time()
        put(publisher, f"/v1/agent/check/{verb}/service:web-1")
        for t in threads:
            t.join()
    latencies.sort()
    expected = changes * len(watchers)
    pct = lambda p: latencies[int((len(latencies) - 1) * p)] * 1000
    print(f"agents: {len(watchers) + 1}, changes: {changes}, observed: {len(latencies)} of {expected}")
    print(f"propagation agent API -> agent API: p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
