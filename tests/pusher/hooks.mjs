// Pusher webhooks from a running pushwire, received here and checked with the Node server SDK
// (`pusher.webhook(...).isValid()`: the X-Pusher-Key, X-Pusher-Signature and Content-Type an
// application's endpoint checks), and presence members of a gateway killed with -9.
//   node hooks.mjs WS_PORT HTTP_PORT APP_ID APP_KEY APP_SECRET WS_PORT_B HOOK_PORT [KILL_PID]
// HOOK_PORT: where the app's webhook URL points (this script listens there). KILL_PID: the
// process of the gateway on WS_PORT_B; when given, it is killed with -9 while a member is on it.
import http from "node:http";
import { WAIT, check, client, connected, more, server, subscribed, within, wsPort, wsPortB } from "./common.mjs";

const [hookPort, killPid] = more;
const events = [];
const invalid = [];
const receiver = http.createServer((req, res) => {
  let rawBody = "";
  req.setEncoding("utf8");
  req.on("data", (chunk) => (rawBody += chunk));
  req.on("end", () => {
    const hook = server.webhook({ headers: req.headers, rawBody });
    if (!hook.isValid()) {
      invalid.push({ headers: req.headers, rawBody });
      res.writeHead(401).end();
      return;
    }
    events.push(...hook.getEvents());
    res.writeHead(200).end();
  });
});
await new Promise((resolve) => receiver.listen(Number(hookPort), "127.0.0.1", resolve));

const same = (e, want) => Object.entries(want).every(([k, v]) => e[k] === v);
const count = (want) => events.filter((e) => same(e, want)).length;
// The first webhook event with the fields of `want`, once it has come.
function arrives(want, ms = WAIT) {
  return within(ms, `webhook ${JSON.stringify(want)}`, new Promise((resolve, reject) => {
    const look = () => {
      if (invalid.length) return reject(new Error(`a webhook failed the SDK's check: ${JSON.stringify(invalid[0])}`));
      const e = events.find((e) => same(e, want));
      if (e) resolve(e);
      else setTimeout(look, 20);
    };
    look();
  }));
}
// A channel occupied and vacated: its channel_vacated comes after anything the tracker sent
// before (one sender per endpoint, in order).
async function marker(name) {
  const m = client(undefined, wsPort);
  await connected(m);
  await subscribed(m, name);
  await arrives({ name: "channel_occupied", channel: name });
  m.disconnect();
  await arrives({ name: "channel_vacated", channel: name });
}

const u1 = { user_id: "u1", user_info: { name: "One" } };
const u2 = { user_id: "u2", user_info: { name: "Two" } };
const a = client(undefined, wsPort, u1);
const b = client(undefined, wsPortB, u2);
const c = client(undefined, wsPortB, u1);
const [sa] = await Promise.all([connected(a), connected(b), connected(c)]);

// Occupied once and each user added once, however many sockets and gateways they are on.
const [pa] = await Promise.all([subscribed(a, "presence-room"), subscribed(b, "presence-room")]);
await subscribed(c, "presence-room");
await arrives({ name: "channel_occupied", channel: "presence-room" });
await arrives({ name: "member_added", channel: "presence-room", user_id: "u1" });
await arrives({ name: "member_added", channel: "presence-room", user_id: "u2" });
check(true, "channel_occupied and member_added");

// A client event, with its data as a string, the sender's socket_id and user_id.
pa.trigger("client-typing", { x: 1 });
const ce = await arrives({ name: "client_event", channel: "presence-room" });
check(
  ce.event === "client-typing" && ce.data === '{"x":1}' && ce.socket_id === sa && ce.user_id === "u1",
  "client_event: event, data as a string, socket_id, user_id",
  ce,
);

// An empty cache channel: cache_miss.
await subscribed(b, "cache-empty");
await arrives({ name: "cache_miss", channel: "cache-empty" });
await arrives({ name: "channel_occupied", channel: "cache-empty" });
check(true, "cache_miss");

// Subscription counts (the app turned them on): to every subscriber, and by webhook.
const counts = [];
a.subscribe("counted").bind("pusher:subscription_count", (d) => counts.push(d.subscription_count));
await Promise.all([subscribed(a, "counted"), subscribed(b, "counted")]);
// Once the last count told is `n`.
const counted = (n) => within(WAIT, `subscription_count ${n}`, new Promise((resolve) => {
  const look = () => (counts.at(-1) === n ? resolve() : setTimeout(look, 20));
  look();
}));
await counted(2);
await arrives({ name: "subscription_count", channel: "counted", subscription_count: 2 });
b.unsubscribe("counted");
await counted(1);
await arrives({ name: "subscription_count", channel: "counted", subscription_count: 1 });
check(true, "subscription_count to the subscribers and by webhook, as subscribers come and go");

// Watchlist events: the watcher is told its users' state at sign-in, then each change, from
// either gateway.
const changes = [];
const watcher = client(undefined, wsPort, undefined, { id: "watcher", watchlist: ["u7", "u8", "signed-9"] });
await connected(watcher);
for (const name of ["online", "offline"]) watcher.user.watchlist.bind(name, (e) => changes.push([name, ...e.user_ids].join(" ")));
const told = (what) => within(WAIT, `watchlist ${what}`, new Promise((resolve) => {
  const look = () => (changes.includes(what) ? resolve() : setTimeout(look, 20));
  look();
}));
watcher.signin();
await told("offline u7 u8 signed-9");
const u7 = client(undefined, wsPortB, undefined, { id: "u7" });
await connected(u7);
u7.signin();
await told("online u7");
u7.disconnect();
await told("offline u7");
check(JSON.stringify(changes) === JSON.stringify(["offline u7 u8 signed-9", "online u7", "offline u7"]), "watchlist: state at sign-in, then online and offline", changes);

if (killPid) {
  // The gateway of b and c is killed: u2 (only there) leaves, for a's client and the webhook;
  // u1 stays (a holds it) and the channel stays occupied.
  const removed = within(WAIT * 3, "member_removed to a", new Promise((resolve) => {
    pa.bind("pusher:member_removed", (m) => resolve(m.id));
  }));
  // c also signs in (as signed-9), watched from a's gateway.
  c.signin();
  await told("online signed-9");
  process.kill(Number(killPid), "SIGKILL");
  check((await removed) === "u2", "a's client got member_removed for the member on the killed gateway");
  await arrives({ name: "member_removed", channel: "presence-room", user_id: "u2" }, WAIT * 3);
  await told("offline signed-9");
  check(true, "watchlist: a user signed in on the killed gateway went offline for the watcher");
  b.disconnect();
  c.disconnect();
  await marker("marker-1");
  check(
    count({ name: "member_removed", user_id: "u1" }) === 0 && count({ name: "channel_vacated", channel: "presence-room" }) === 0,
    "u1 (on a live gateway) stayed, the channel stayed occupied",
    events,
  );
  a.disconnect();
} else {
  // Everyone leaves at once, on both gateways.
  for (const x of [a, b, c]) x.disconnect();
}
await arrives({ name: "channel_vacated", channel: "presence-room" });
await arrives({ name: "member_removed", channel: "presence-room", user_id: "u1" });
await marker("marker-2");
for (const [want, n] of [
  [{ name: "channel_occupied", channel: "presence-room" }, 1],
  [{ name: "channel_vacated", channel: "presence-room" }, 1],
  [{ name: "member_added", user_id: "u1" }, 1],
  [{ name: "member_added", user_id: "u2" }, 1],
  [{ name: "member_removed", user_id: "u1" }, 1],
  [{ name: "member_removed", user_id: "u2" }, 1],
  [{ name: "channel_occupied", channel: "cache-empty" }, 1],
  [{ name: "channel_vacated", channel: "cache-empty" }, 1],
  [{ name: "cache_miss", channel: "cache-empty" }, 1],
  [{ name: "client_event" }, 1],
]) {
  check(count(want) === n, `exactly ${n}: ${JSON.stringify(want)}`, events);
}
receiver.close();
console.log("all passed");
process.exit(0);
