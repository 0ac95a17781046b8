// What the Pusher test scripts share: their arguments, the server SDK, and checks with deadlines.
//   node SCRIPT WS_PORT HTTP_PORT APP_ID APP_KEY APP_SECRET [WS_PORT_B]
import PusherServer from "pusher";

export const [wsPort, httpPort, appId, key, secret, wsPortB] = process.argv.slice(2);
export const server = new PusherServer({ appId, key, secret, host: "127.0.0.1", port: httpPort, useTLS: false });
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
