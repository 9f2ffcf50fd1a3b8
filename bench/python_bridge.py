"""The minimal Python bridge (context figure): cable frames in, each event's data to NATS core.

usage: python_bridge.py CABLE_URL NATS_URL COUNT   (exits after COUNT events)
"""
import asyncio, json, sys
import nats, websockets

IDENTIFIER = json.dumps({"channel": "RoomChannel", "pubsub_token": "bench-token", "account_id": 1, "user_id": 1}, separators=(",", ":"))

async def main(cable, nats_url, count):
    nc = await nats.connect(nats_url)
    async with websockets.connect(cable, subprotocols=["actioncable-v1-json"], max_size=None) as ws:
        got = 0
        async for text in ws:
            frame = json.loads(text)
            if frame.get("type") == "welcome":
                await ws.send(json.dumps({"command": "subscribe", "identifier": IDENTIFIER}))
            elif "message" in frame and "type" not in frame:
                message = frame["message"]
                await nc.publish("bench." + message["event"], json.dumps(message["data"], separators=(",", ":")).encode())
                got += 1
                if got >= count:
                    break
    await nc.flush()
    await nc.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
