"""The Pusher HTTP API from the official Python SDK (`pusher` on PyPI), with a raw WebSocket
client speaking the protocol (the `websockets` library) to see what arrives.

    python3 sdk.py WS_PORT HTTP_PORT APP_ID APP_KEY APP_SECRET

Prints one line per check; exits 1 at the first failure, 0 when all pass.
"""
import asyncio
import json
import sys

import pusher
import websockets

ws_port, http_port, app_id, key, secret = sys.argv[1:6]
sdk = pusher.Pusher(app_id=app_id, key=key, secret=secret, host="127.0.0.1", port=int(http_port), ssl=False)


def check(ok, what, seen=None):
    if not ok:
        print(f"FAIL {what}: {seen!r}")
        sys.exit(1)
    print(f"ok {what}")


async def recv(ws, event):
    """The next message named `event` (pusher:* bookkeeping in between is skipped)."""
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if m["event"] == event:
            return m


async def main():
    url = f"ws://127.0.0.1:{ws_port}/app/{key}?protocol=7&client=python&version=1"
    async with websockets.connect(url) as ws:
        hello = await recv(ws, "pusher:connection_established")
        data = json.loads(hello["data"])
        check(data["activity_timeout"] > 0 and "." in data["socket_id"], "connection_established", data)
        await ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        check((await recv(ws, "pusher:pong"))["event"] == "pusher:pong", "pusher:ping answered")
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"auth": "", "channel": "py-news"}}))
        ok = await recv(ws, "pusher_internal:subscription_succeeded")
        check(ok["channel"] == "py-news", "subscribed", ok)

        # The SDK's trigger (a JSON body with body_md5), and the event as the client gets it.
        await asyncio.to_thread(sdk.trigger, "py-news", "greet", {"from": "python"})
        got = await recv(ws, "greet")
        check(got == {"event": "greet", "channel": "py-news", "data": json.dumps({"from": "python"}, separators=(",", ":"))}
              or json.loads(got["data"]) == {"from": "python"}, "trigger from the Python SDK arrives", got)

        # GETs: the Python SDK adds the digest of the empty body, and signs it.
        info = await asyncio.to_thread(sdk.channels_info, None, ["subscription_count"])
        check(info["channels"]["py-news"]["subscription_count"] == 1, "channels_info with body_md5 on a GET", info)
        one = await asyncio.to_thread(sdk.channel_info, "py-news", ["subscription_count"])
        check(one["occupied"] is True and one["subscription_count"] == 1, "channel_info", one)

        # A socket_id excludes that socket: a marker published after it comes first.
        await asyncio.to_thread(sdk.trigger, "py-news", "skipped", {}, data["socket_id"])
        await asyncio.to_thread(sdk.trigger, "py-news", "marker", {})
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        check(m["event"] == "marker", "socket_id excluded the sender; the marker came next", m)

        # A batch.
        await asyncio.to_thread(sdk.trigger_batch, [
            {"channel": "py-news", "name": "b1", "data": "1"},
            {"channel": "py-news", "name": "b2", "data": "2"},
        ])
        b1, b2 = json.loads(await asyncio.wait_for(ws.recv(), 10)), json.loads(await asyncio.wait_for(ws.recv(), 10))
        check((b1["event"], b2["event"]) == ("b1", "b2"), "trigger_batch in order", (b1, b2))

        # Standalone serves the HTTP API on the WebSocket port too: one host and port.
        same_port = pusher.Pusher(app_id=app_id, key=key, secret=secret, host="127.0.0.1", port=int(ws_port), ssl=False)
        await asyncio.to_thread(same_port.trigger, "py-news", "via-ws-port", {})
        check((await recv(ws, "via-ws-port"))["channel"] == "py-news", "the HTTP API on the WebSocket port")

    # Sign-in through the SDK's signature; send_to_user; a stranger refused the user's channel;
    # terminate_user_connections (the SDK calls /users/ID/terminate_connections, without the app).
    async with websockets.connect(url) as ws, websockets.connect(url) as other:
        socket_id = json.loads((await recv(ws, "pusher:connection_established"))["data"])["socket_id"]
        await recv(other, "pusher:connection_established")
        signed = sdk.authenticate_user(socket_id, {"id": "py-7", "user_info": {"n": 1}})
        await ws.send(json.dumps({"event": "pusher:signin", "data": signed}))
        ok = await recv(ws, "pusher:signin_success")
        check(json.loads(ok["data"]["user_data"])["id"] == "py-7", "signin with the SDK's signature", ok)
        await other.send(json.dumps({"event": "pusher:subscribe", "data": {"auth": "", "channel": "#server-to-user-py-7"}}))
        refused = await recv(other, "pusher:subscription_error")
        check(refused["channel"] == "#server-to-user-py-7", "another socket is refused the user's channel", refused)
        await asyncio.to_thread(sdk.send_to_user, "py-7", "note", {"to": "py-7"})
        note = await recv(ws, "note")
        check(note["channel"] == "#server-to-user-py-7", "send_to_user reaches the signed-in socket", note)
        await asyncio.to_thread(sdk.terminate_user_connections, "py-7")
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as e:
            check(e.rcvd is not None and e.rcvd.code == 4009, "terminate_user_connections closes it with 4009", e.rcvd)
        await other.send(json.dumps({"event": "pusher:ping", "data": {}}))
        check((await recv(other, "pusher:pong"))["event"] == "pusher:pong", "the other socket stays")

    wrong = pusher.Pusher(app_id=app_id, key=key, secret="wrong", host="127.0.0.1", port=int(http_port), ssl=False)
    try:
        wrong.trigger("py-news", "x", {})
        check(False, "a wrong secret is refused")
    except pusher.errors.PusherBadAuth:
        check(True, "a wrong secret is refused (401)")
    print("all passed")


asyncio.run(main())
