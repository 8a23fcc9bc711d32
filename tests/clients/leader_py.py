"""Consul's leader-election recipe with py-consul, unchanged: a session
with a TTL (renewed in the background) and a lock delay, acquire the
key, and while not the leader, block on the key until its session is
gone and try again. Writes "leader <name> <unix-ms>" and "lost <name>"
lines to stdout. Usage: leader_py.py HOST PORT NAME KEY."""

import sys
import threading
import time

import consul

host, port, name, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = consul.Consul(host=host, port=port)
session = c.session.create(name=f"leader-{name}", ttl=10, lock_delay=1, behavior="release")

def renew():
    while True:
        time.sleep(3)
        c.session.renew(session)

threading.Thread(target=renew, daemon=True).start()

index = None
while True:
    if c.kv.put(key, name, acquire=session):
        print(f"leader {name} {int(time.time() * 1000)}", flush=True)
        # Lead until the lock is lost.
        while True:
            index, entry = c.kv.get(key, index=index, wait="5s")
            if entry is None or entry.get("Session") != session:
                print(f"lost {name}", flush=True)
                break
    else:
        index, entry = c.kv.get(key, index=index, wait="5s")
        if entry is not None and entry.get("Session"):
            continue
        # The holder is gone: the lock delay may still hold it briefly.
        time.sleep(0.2)
