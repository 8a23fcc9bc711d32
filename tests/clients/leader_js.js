// Consul's leader-election recipe with node-consul, unchanged (as
// leader_py.py). Usage: node leader_js.js HOST PORT NAME KEY.
const Consul = require("consul");

async function main() {
  const [host, port, name, key] = process.argv.slice(2);
  const c = new Consul({ host, port: Number(port) });
  const session = (await c.session.create({ name: `leader-${name}`, ttl: "10s", lockdelay: "1s" })).ID;
  setInterval(() => c.session.renew(session).catch(() => {}), 3000);
  let index;
  for (;;) {
    if (await c.kv.set({ key, value: name, acquire: session })) {
      console.log(`leader ${name} ${Date.now()}`);
      for (;;) {
        const entry = await c.kv.get(index ? { key, index, wait: "5s" } : { key });
        if (!entry || entry.Session !== session) {
          console.log(`lost ${name}`);
          break;
        }
        index = entry.ModifyIndex;
      }
    } else {
      const entry = await c.kv.get({ key });
      if (entry && entry.Session) {
        await c.kv.get({ key, index: entry.ModifyIndex, wait: "5s" });
        continue;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
