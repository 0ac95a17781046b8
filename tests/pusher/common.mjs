// What the Pusher test scripts share: their arguments, the server SDK, pusher-js clients, and
// checks with deadlines.
//   node SCRIPT WS_PORT HTTP_PORT APP_ID APP_KEY APP_SECRET [WS_PORT_B [MORE...]]
import Pusher from "pusher-js";
import PusherServer from "pusher";

export const [wsPort, httpPort, appId, key, secret, wsPortB, ...more] = process.argv.slice(2);
// The master key of encrypted channels (any 32 bytes; the server never has it).
const encryptionMasterKeyBase64 = Buffer.alloc(32, 7).toString("base64");
export const server = new PusherServer({
  appId, key, secret, host: "127.0.0.1", port: httpPort, useTLS: false, encryptionMasterKeyBase64,
});
export const WAIT = 10_000;

// Print the check; exit 1 at the first failure, with what was seen.
export function check(ok, what, seen) {
  if (!ok) {
    console.log(`FAIL ${what}${seen === undefined ? "" : `: ${JSON.stringify(seen)}`}`);
    process.exit(1);
  }
  console.log(`ok ${what}`);
}

// `promise`, or a failure named `what` after `ms`.
export function within(ms, what, promise) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms)),
  ]);
}

// The options that point pusher-js (and Echo) at gateway `port`.
export function at(port) {
  return { cluster: "local", wsHost: "127.0.0.1", wsPort: Number(port), forceTLS: false, enabledTransports: ["ws"], disableStats: true };
}

// A pusher-js client of app `appKey` on gateway `port`; `user`: its presence channel_data;
// `userData`: what it signs in as.
export function client(appKey = key, port = wsPort, user = undefined, userData = { id: "signed-9", user_info: { name: "Nine" } }) {
  return new Pusher(appKey, {
    ...at(port),
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        callback(null, server.authorizeChannel(socketId, channelName, user));
      },
    },
    userAuthentication: {
      customHandler: ({ socketId }, callback) => {
        callback(null, server.authenticateUser(socketId, userData));
      },
    },
  });
}

// The socket_id, once `c` is connected.
export function connected(c) {
  return within(WAIT, "connected", new Promise((resolve, reject) => {
    c.connection.bind("connected", () => resolve(c.connection.socket_id));
    c.connection.bind("failed", () => reject(new Error("failed")));
  }));
}

// The channel, once `c` is subscribed to `name`.
export function subscribed(c, name) {
  const ch = c.subscribe(name);
  return within(WAIT, `subscribed to ${name}`, new Promise((resolve, reject) => {
    ch.bind("pusher:subscription_succeeded", () => resolve(ch));
    ch.bind("pusher:subscription_error", (e) => reject(new Error(JSON.stringify(e))));
  }));
}
