// node-consul against a Signpost agent: KV, a transaction, sessions and
// a lock, as a Node.js application uses them. Usage:
// node node_consul.js HOST PORT. Prints "ok" when every assertion held.
const assert = require("node:assert/strict");
const Consul = require("consul");

async function main() {
  const [host, port] = process.argv.slice(2);
  const c = new Consul({ host, port: Number(port) });
  // node-consul decodes a `false` answer as undefined: refusals are
  // checked as falsy.

  assert.equal(await c.kv.set("js/a", "1", { flags: 3 }), true);
  const a = await c.kv.get("js/a");
  assert.equal(a.Value, "1");
  assert.equal(a.Flags, 3);
  assert.equal(await c.kv.get("js/none"), undefined);
  assert.ok(!await c.kv.set({ key: "js/a", value: "2", cas: 0 }), "refused");
  assert.equal(await c.kv.set({ key: "js/a", value: "2", cas: a.ModifyIndex }), true);
  await c.kv.set("js/dir/x", "x");
  const keys = await c.kv.keys({ key: "js/", separator: "/" });
  assert.deepEqual(keys, ["js/a", "js/dir/"]);
  const all = await c.kv.get({ key: "js/", recurse: true });
  assert.deepEqual(all.map((e) => e.Key), ["js/a", "js/dir/x"]);

  const txn = await c.transaction.create([
    { KV: { Verb: "set", Key: "js/t", Value: Buffer.from("t").toString("base64") } },
    { KV: { Verb: "get", Key: "js/t" } },
  ]);
  assert.equal(Buffer.from(txn.Results[1].KV.Value, "base64").toString(), "t");

  const s1 = (await c.session.create({ name: "js-lock", ttl: "10s", lockdelay: "0s" })).ID;
  const s2 = (await c.session.create({ name: "js-other", lockdelay: "0s" })).ID;
  const info = await c.session.info(s1);
  assert.equal(info.Name, "js-lock");
  assert.equal(await c.kv.set({ key: "js/lock", value: "me", acquire: s1 }), true);
  assert.ok(!await c.kv.set({ key: "js/lock", value: "you", acquire: s2 }), "refused");
  assert.equal((await c.kv.get("js/lock")).Session, s1);
  await c.session.renew(s1);
  await c.session.destroy(s1);
  assert.equal(await c.kv.set({ key: "js/lock", value: "you", acquire: s2 }), true);
  const list = await c.session.list();
  assert.ok(list.some((s) => s.ID === s2));
  await c.session.destroy(s2);

  assert.equal(await c.kv.del({ key: "js/", recurse: true }), true);
  assert.equal(await c.kv.get({ key: "js/", recurse: true }), undefined);
  console.log("ok");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
