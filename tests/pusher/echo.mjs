// Laravel Echo (with pusher-js, as a Laravel app's resources/js/echo.js sets it up) against a
// running pushwire, and the `pusher` Node SDK standing in for Laravel's broadcaster.
//   node echo.mjs WS_PORT HTTP_PORT APP_ID APP_KEY APP_SECRET [WS_PORT_B]
import Echo from "laravel-echo";
import Pusher from "pusher-js";
import { WAIT, at, check, key, server, within as withinMs, wsPort, wsPortB } from "./common.mjs";

const within = (what, promise) => withinMs(WAIT, what, promise);

// Echo as Laravel's broadcasting docs configure it for Reverb or Pusher, pointed at pushwire;
// the authorizer signs as the app's /broadcasting/auth would for `user`.
function echo(port, user) {
  return new Echo({
    broadcaster: "pusher",
    key,
    ...at(port),
    Pusher,
    authorizer: (channel) => ({
      authorize: (socketId, callback) => {
        const data = channel.name.startsWith("presence-") ? user : undefined;
        callback(null, server.authorizeChannel(socketId, channel.name, data));
      },
    }),
  });
}

const ann = { user_id: "1", user_info: { name: "Ann" } };
const bob = { user_id: "2", user_info: { name: "Bob" } };
const ea = echo(wsPort, ann), eb = echo(wsPortB ?? wsPort, bob);

// A public channel and Laravel's event names: `OrderShipped` is `App\Events\OrderShipped`.
const shipped = within("OrderShipped", new Promise((resolve) => {
  ea.channel("orders").listen("OrderShipped", (e) => resolve(e));
}));
await within("subscribed", new Promise((r) => ea.connector.pusher.channel("orders").bind("pusher:subscription_succeeded", r)));
await server.trigger("orders", "App\\Events\\OrderShipped", { order: { id: 42 } });
check((await shipped).order.id === 42, "Echo.channel().listen(): a Laravel event by its class name");

// A private channel, and a custom event name (`.name`).
const priv = within("private", new Promise((resolve) => {
  ea.private("orders.42").listen(".status", (e) => resolve(e));
}));
await within("private subscribed", new Promise((r) => ea.connector.pusher.channel("private-orders.42").bind("pusher:subscription_succeeded", r)));
await server.trigger("private-orders.42", "status", { state: "sent" });
check((await priv).state === "sent", "Echo.private(): an event on private-orders.42");

// Presence: here, joining, leaving, and whispers.
const here = within("here", new Promise((resolve) => {
  ea.join("chat").here((users) => resolve(users));
}));
check((await here).length === 1 && (await here)[0].name === "Ann", "Echo.join().here(): alone", await here);
const joining = within("joining", new Promise((resolve) => ea.join("chat").joining((u) => resolve(u))));
const hereB = within("here b", new Promise((resolve) => eb.join("chat").here((users) => resolve(users))));
check((await hereB).map((u) => u.name).sort().join() === "Ann,Bob", "Echo.join().here() on the other gateway", await hereB);
check((await joining).name === "Bob", "Echo.join().joining()", await joining);
const whisper = within("whisper", new Promise((resolve) => eb.join("chat").listenForWhisper("typing", (e) => resolve(e))));
ea.join("chat").whisper("typing", { name: "Ann" });
check((await whisper).name === "Ann", "whisper() reaches the other member");
const leaving = within("leaving", new Promise((resolve) => eb.join("chat").leaving((u) => resolve(u))));
ea.leave("chat");
check((await leaving).name === "Ann", "Echo.leave(): the other member sees leaving()", await leaving);

ea.disconnect();
eb.disconnect();
console.log("all passed");
process.exit(0);
