"""py-consul against a Signpost agent: KV (every flag), blocking reads,
transactions and sessions, as an application uses them. Usage:
py_consul_kv.py HOST PORT. Prints "ok" when every assertion held."""

import base64
import sys
import threading
import time

import consul

host, port = sys.argv[1], int(sys.argv[2])
c = consul.Consul(host=host, port=port)

# PUT/GET with flags; a missing key is (index, None).
assert c.kv.put("py/a", "1", flags=5) is True
index, e = c.kv.get("py/a")
assert e["Value"] == b"1" and e["Flags"] == 5, e
assert int(index) >= e["ModifyIndex"]
assert c.kv.get("py/none")[1] is None
# An empty value reads back as None.
assert c.kv.put("py/empty", None) is True
assert c.kv.get("py/empty")[1]["Value"] is None

# CAS.
assert c.kv.put("py/a", "2", cas=0) is False
assert c.kv.put("py/a", "2", cas=e["ModifyIndex"] + 1000) is False
assert c.kv.put("py/a", "2", cas=e["ModifyIndex"]) is True
assert c.kv.get("py/a")[1]["Value"] == b"2"

# recurse and keys with a separator.
c.kv.put("py/dir/x", "x")
c.kv.put("py/dir/y", "y")
_, keys = c.kv.get("py/", keys=True, separator="/")
assert keys == ["py/a", "py/dir/", "py/empty"], keys
_, entries = c.kv.get("py/dir/", recurse=True)
assert [x["Key"] for x in entries] == ["py/dir/x", "py/dir/y"], entries

# A blocking read returns with the change it waited for.
index, _ = c.kv.get("py/dir/", recurse=True)
def later():
    time.sleep(0.3)
    c.kv.put("py/dir/z", "z")
threading.Thread(target=later).start()
new_index, entries = c.kv.get("py/dir/", recurse=True, index=index, wait="30s")
assert int(new_index) > int(index)
assert "py/dir/z" in [x["Key"] for x in entries], entries

# DELETE with cas, then recurse.
_, e = c.kv.get("py/a")
assert c.kv.delete("py/a", cas=e["ModifyIndex"] + 1000) is False
assert c.kv.delete("py/a", cas=e["ModifyIndex"]) is True
assert c.kv.delete("py/dir/", recurse=True) is True
assert c.kv.get("py/dir/", recurse=True)[1] is None

# Transactions: all or nothing.
b64 = lambda s: base64.b64encode(s.encode()).decode()
r = c.txn.put([
    {"KV": {"Verb": "set", "Key": "py/t1", "Value": b64("one")}},
    {"KV": {"Verb": "set", "Key": "py/t2", "Value": b64("two")}},
    {"KV": {"Verb": "get", "Key": "py/t1"}},
])
assert len(r["Results"]) == 3, r
assert base64.b64decode(r["Results"][2]["KV"]["Value"]) == b"one"
try:
    c.txn.put([
        {"KV": {"Verb": "delete", "Key": "py/t1"}},
        {"KV": {"Verb": "check-not-exists", "Key": "py/t2"}},
    ])
    raise AssertionError("a failed transaction must raise")
except consul.ConsulException as err:
    assert "409" in str(err) or "exists" in str(err), err
assert c.kv.get("py/t1")[1]["Value"] == b"one", "rolled back"

# Sessions and a lock.
s1 = c.session.create(name="py-lock", ttl=10, lock_delay=0)
s2 = c.session.create(name="py-other", lock_delay=0)
_, info = c.session.info(s1)
assert info["Name"] == "py-lock" and info["TTL"] == "10s", info
c.session.renew(s1)
assert c.kv.put("py/lock", "me", acquire=s1) is True
assert c.kv.put("py/lock", "you", acquire=s2) is False
assert c.kv.get("py/lock")[1]["Session"] == s1
assert c.kv.put("py/lock", "me", release=s1) is True
assert c.kv.put("py/lock", "you", acquire=s2) is True
_, sessions = c.session.list()
assert {s1, s2} <= {s["ID"] for s in sessions}
_, mine = c.session.node(info["Node"])
assert s1 in [s["ID"] for s in mine]
assert c.session.destroy(s1) is True
assert c.session.destroy(s2) is True
assert c.kv.get("py/lock")[1].get("Session") is None

# An endpoint Signpost does not serve raises (never a silent None).
try:
    c.query.list()
    raise AssertionError("an unserved endpoint must raise")
except consul.ConsulException:
    pass

print("ok")
