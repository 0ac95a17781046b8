// Pusher protocol against a running pushwire, with the libraries applications use: pusher-js
// (the browser/Node client) and the `pusher` server SDK for Node.
//   node basic.mjs WS_PORT HTTP_PORT APP_ID APP_KEY APP_SECRET [WS_PORT_B]
// (WS_PORT_B: the gateway of the second client, to check delivery across gateways.)
// Prints one line per check; exits 1 at the first failure (with what was seen), 0 when all pass.
import Pusher from "pusher-js";
import PusherServer from "pusher";
import {
  WAIT, appId, check, client, connected, httpPort, key, secret, server, subscribed, within, wsPort, wsPortB,
} from "./common.mjs";

// Events `ch` gets, in order, until one named `last`.
function until(ch, last) {
  const got = [];
  return within(WAIT, `until ${last}`, new Promise((resolve) => {
    ch.bind_global((event, data) => {
      if (event.startsWith("pusher")) return;
      got.push([event, data]);
      if (event === last) resolve(got);
    });
  }));
}

// Connection and socket id.
const a = client();
const b = client(key, wsPortB ?? wsPort);
const [sa, sb] = await Promise.all([connected(a), connected(b)]);
check(/^\d+\.\d+$/.test(sa) && sa !== sb, "socket_id is NUMBER.NUMBER and unique", [sa, sb]);

// A public channel: an event from the server SDK reaches each subscriber once, data parsed.
const [na, nb] = await Promise.all([subscribed(a, "news"), subscribed(b, "news")]);
let ga = until(na, "end"), gb = until(nb, "end");
await server.trigger("news", "greet", { hi: 1 });
await server.trigger("news", "end", {});
check(JSON.stringify(await ga) === JSON.stringify([["greet", { hi: 1 }], ["end", {}]]), "public event reaches a", await ga);
check(JSON.stringify(await gb) === JSON.stringify([["greet", { hi: 1 }], ["end", {}]]), "public event reaches b", await gb);

// socket_id leaves that one socket out.
ga = until(na, "end2"); gb = until(nb, "end2");
await server.trigger("news", "not-for-a", { x: 1 }, { socket_id: sa });
await server.trigger("news", "end2", {});
check(JSON.stringify(await ga) === JSON.stringify([["end2", {}]]), "socket_id excluded a", await ga);
check((await gb).length === 2, "b got the event a was excluded from", await gb);

// A batch, and an event to several channels at once.
const [ma] = [await subscribed(a, "more")];
ga = until(ma, "b2");
await server.triggerBatch([{ channel: "more", name: "b1", data: "1" }, { channel: "more", name: "b2", data: "2" }]);
check(JSON.stringify(await ga) === JSON.stringify([["b1", 1], ["b2", 2]]), "batch events in order", await ga);
ga = until(ma, "multi");
const gn = until(na, "multi");
await server.trigger(["news", "more"], "multi", "both");
check((await ga).length === 1 && (await gn).length === 1, "one event to two channels", [await ga, await gn]);
const withInfo = await (await server.trigger(["news", "more"], "counted", {}, { info: "subscription_count" })).json();
check(withInfo.channels?.news?.subscription_count === 2 && withInfo.channels?.more?.subscription_count === 1,
  "trigger with info: each channel's subscriptions", withInfo);

// Private channel: authorized by the SDK's signature; client events go to the others only.
const [pa, pb] = await Promise.all([subscribed(a, "private-chat"), subscribed(b, "private-chat")]);
ga = until(pa, "mark"); gb = until(pb, "mark");
check(pa.trigger("client-typing", { who: "a" }), "pusher-js accepted the client event");
await new Promise((r) => setTimeout(r, 50));
await server.trigger("private-chat", "mark", {});
check(JSON.stringify(await gb) === JSON.stringify([["client-typing", { who: "a" }], ["mark", {}]]), "client event reached b", await gb);
check(JSON.stringify(await ga) === JSON.stringify([["mark", {}]]), "client event not echoed to a", await ga);

// A private subscription with a bad signature is refused; the socket stays up.
const bad = new Pusher(key, {
  cluster: "local", wsHost: "127.0.0.1", wsPort: Number(wsPort), forceTLS: false, enabledTransports: ["ws"],
  disableStats: true,
  channelAuthorization: { customHandler: (_, cb) => cb(null, { auth: `${key}:${"0".repeat(64)}` }) },
});
await connected(bad);
const refused = within(WAIT, "refusal", new Promise((resolve) => {
  bad.connection.bind("error", (e) => resolve(e));
}));
bad.subscribe("private-chat");
const err = await refused;
check(err?.data?.code === 4009, "bad signature: pusher:error 4009", err);
check(bad.connection.state === "connected", "the refused socket stays connected", bad.connection.state);

// An encrypted channel: the server SDK encrypts with the app's master key, pushwire relays the
// ciphertext, pusher-js decrypts with the shared secret its authorization gave it (on the other
// gateway too); client events are refused there.
const [xa, xb] = await Promise.all([subscribed(a, "private-encrypted-vault"), subscribed(b, "private-encrypted-vault")]);
const sealed = (ch) => within(WAIT, "decrypted event", new Promise((resolve) => ch.bind("sealed", (d) => resolve(d))));
const [da, db] = [sealed(xa), sealed(xb)];
await server.trigger("private-encrypted-vault", "sealed", { secret: "plain text" });
check(JSON.stringify([await da, await db]) === JSON.stringify([{ secret: "plain text" }, { secret: "plain text" }]),
  "private-encrypted: decrypted by both subscribers", [await da, await db]);
const xerr = within(WAIT, "client event refused", new Promise((resolve) => a.connection.bind("error", (e) => resolve(e))));
a.send_event("client-x", { x: 1 }, "private-encrypted-vault");
check((await xerr)?.data?.code === 4300, "private-encrypted: client events refused", await xerr);

// Cache channels: the last event for a new subscriber; a miss when there is none.
await server.trigger("cache-weather", "now", { t: 21 });
const cached = new Promise((resolve) => {
  const ch = a.subscribe("cache-weather");
  ch.bind("now", (d) => resolve(d));
});
check(JSON.stringify(await within(WAIT, "cached event", cached)) === JSON.stringify({ t: 21 }), "cache channel replays the last event");
const miss = new Promise((resolve) => {
  const ch = a.subscribe("cache-empty");
  ch.bind("pusher:cache_miss", () => resolve(true));
});
check(await within(WAIT, "cache miss", miss), "cache channel without an event: pusher:cache_miss");

// An unknown key: the connection is refused with 4001 and not retried.
const stranger = client("no-such-key");
const failed = await within(WAIT, "refusal of an unknown key", new Promise((resolve) => {
  stranger.connection.bind("error", (e) => resolve(e));
}));
check(failed?.error?.data?.code === 4001, "unknown app key: pusher:error 4001", failed);
await within(WAIT, "no retry after 4001", new Promise((resolve) => {
  const done = () => (["disconnected", "failed"].includes(stranger.connection.state) ? resolve() : setTimeout(done, 20));
  done();
}));
check(true, "unknown app key: the client gives up");

// Channel queries count subscriptions on every gateway.
const list = await (await server.get({ path: "/channels", params: { info: "subscription_count" } })).json();
check(list.channels?.news?.subscription_count === 2 && list.channels?.["private-chat"]?.subscription_count === 2,
  "GET /channels: occupied channels with their subscriptions", list);
const some = await (await server.get({ path: "/channels", params: { filter_by_prefix: "private-" } })).json();
check(JSON.stringify(Object.keys(some.channels).sort()) === JSON.stringify(["private-chat", "private-encrypted-vault"]),
  "GET /channels?filter_by_prefix", some);
const one = await (await server.get({ path: "/channels/news", params: { info: "subscription_count" } })).json();
check(one.occupied === true && one.subscription_count === 2, "GET /channels/news", one);
const none = await (await server.get({ path: "/channels/nobody-here" })).json();
check(none.occupied === false, "GET /channels/C of an empty channel: not occupied", none);
let refusedStatus = 0;
try { await server.get({ path: "/channels", params: { info: "user_count" } }); } catch (e) { refusedStatus = e.status; }
check(refusedStatus === 400, "user_count without filter_by_prefix=presence-: 400", refusedStatus);

// The HTTP API refuses a bad signature.
const wrong = new PusherServer({ appId, key, secret: "not-the-secret", host: "127.0.0.1", port: httpPort, useTLS: false });
let status = 0;
try { await wrong.trigger("news", "x", {}); } catch (e) { status = e.status; }
check(status === 401, "HTTP API: wrong secret answered 401", status);

// Presence: members across gateways, a user with two sockets counted once, member_added and
// member_removed to the others, client events with the sender's user_id.
const u1 = { user_id: "u1", user_info: { name: "Ann" } };
const u2 = { user_id: 2, user_info: { name: "Bob" } };
const pa1 = client(key, wsPort, u1), pb2 = client(key, wsPortB ?? wsPort, u2);
await Promise.all([connected(pa1), connected(pb2)]);
const ra = await subscribed(pa1, "presence-room");
check(ra.members.count === 1 && ra.members.me.id === "u1" && ra.members.me.info.name === "Ann", "presence: alone at first", ra.members);
const added = within(WAIT, "member_added", new Promise((resolve) => ra.bind("pusher:member_added", (m) => resolve(m))));
const rb = await subscribed(pb2, "presence-room");
const ids = []; rb.members.each((m) => ids.push(m.id));
check(rb.members.count === 2 && JSON.stringify(ids.sort()) === JSON.stringify(["2", "u1"]), "presence: both members, numeric user_id as a string", ids);
const m2 = await added;
check(m2.id === "2" && m2.info.name === "Bob", "presence: member_added to the member already there", m2);
const users = await (await server.get({ path: "/channels/presence-room/users" })).json();
check(JSON.stringify(users.users.map((u) => u.id).sort()) === JSON.stringify(["2", "u1"]), "GET /channels/C/users", users);
const pc = await (await server.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count" } })).json();
check(pc.channels?.["presence-room"]?.user_count === 2, "GET /channels?filter_by_prefix=presence-&info=user_count", pc);
// A second socket of u1: counted once, no member_added, and no member_removed when it goes.
const seen = [];
rb.bind("pusher:member_added", (m) => seen.push(["added", m.id]));
rb.bind("pusher:member_removed", (m) => seen.push(["removed", m.id]));
const pa1b = client(key, wsPort, u1);
await connected(pa1b);
const second = await subscribed(pa1b, "presence-room");
check(second.members.count === 2, "presence: a second socket of a user counts once", second.members.count);
pa1b.disconnect();
let marks = until(rb, "mark-p");
await new Promise((r) => setTimeout(r, 300));
await server.trigger("presence-room", "mark-p", {});
await marks;
check(seen.length === 0, "presence: the second socket of u1 came and went without member_added or member_removed", seen);
// Client events on a presence channel carry the sender's user_id.
const whisper = within(WAIT, "client event with user_id", new Promise((resolve) => {
  rb.bind("client-hello", (data, meta) => resolve([data, meta]));
}));
ra.trigger("client-hello", { x: 1 });
const [wdata, wmeta] = await whisper;
check(wdata.x === 1 && wmeta?.user_id === "u1", "presence: client event with the sender's user_id", [wdata, wmeta]);
// u1's last socket leaves: member_removed to the others.
const removed = within(WAIT, "member_removed", new Promise((resolve) => rb.bind("pusher:member_removed", (m) => resolve(m))));
pa1.disconnect();
check((await removed).id === "u1", "presence: member_removed when the user's last socket leaves");
check(rb.members.count === 1, "presence: one member left", rb.members.count);
pb2.disconnect();

// User authentication: sign in, get what is sent to the user, and be terminated.
const s9 = client(key, wsPortB ?? wsPort);
await connected(s9);
s9.signin();
await within(WAIT, "signin", s9.user.signinDonePromise);
check(s9.user.user_data?.id === "signed-9", "signin: pusher:signin_success", s9.user.user_data);
await within(WAIT, "user channel", new Promise((resolve) => {
  const wait = () => (s9.user.serverToUserChannel?.subscribed ? resolve() : setTimeout(wait, 20));
  wait();
}));
const note = within(WAIT, "sendToUser", new Promise((resolve) => s9.user.bind("note", (d) => resolve(d))));
await server.sendToUser("signed-9", "note", { for: "nine" });
check((await note).for === "nine", "sendToUser reaches the signed-in socket");
// A signed-in socket joins a presence channel as its user, with no channel_data.
const asUser = await subscribed(s9, "presence-signed");
check(asUser.members.count === 1 && asUser.members.me?.id === "signed-9" && asUser.members.me?.info?.name === "Nine",
  "presence after sign-in: the member is the signed-in user", asUser.members);
const gone = within(WAIT, "terminated", new Promise((resolve) => {
  s9.connection.bind("state_change", ({ current }) => { if (current !== "connected") resolve(current); });
}));
await server.terminateUserConnections("signed-9");
check(["disconnected", "unavailable", "failed", "connecting"].includes(await gone), "terminateUserConnections closes the user's socket");
s9.disconnect();

for (const c of [a, b, bad, stranger]) c.disconnect();
console.log("all passed");
process.exit(0);
