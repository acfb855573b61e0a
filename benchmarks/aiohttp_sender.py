"""The straightforward Python client, for comparison: aiohttp + uvloop + orjson, each message
signed (bulksend's SDK-HMAC-SHA256 signer), 64 tasks sharing one connection pool. No ledger,
no stats: the floor a plain asyncio client sets.

    python benchmarks/aiohttp_sender.py URL MESSAGES.jsonl [CONCURRENCY]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from urllib.parse import urlsplit

import aiohttp
import orjson
import uvloop

from bulksend.signing import FastSigner

PATH = "/v2/rocketmq/bench-project/instances/bench-instance/messages"


def read(path: str) -> list[dict[str, object]]:
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh]


async def main() -> None:
    url, path, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3] if len(sys.argv) > 3 else 64)
    host = urlsplit(url).netloc
    fixed = {"Host": host, "Content-Type": "application/json", "X-Project-Id": "bench-project"}
    signer = FastSigner(
        "POST",
        PATH,
        fixed,
        ak=os.environ["HUAWEICLOUD_SDK_AK"],
        sk=os.environ["HUAWEICLOUD_SDK_SK"],
    )
    records = read(path)
    queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue(2 * concurrency)
    failed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        while (rec := await queue.get()) is not None:
            body = orjson.dumps(
                {
                    "topic": rec["topic"],
                    "body": rec["body"],
                    "property_list": [{"name": "KEYS", "value": rec["keys"]}],
                }
            )
            date = signer.date_for(time.time())
            headers = {
                **fixed,
                "X-Sdk-Date": date,
                "Authorization": signer.authorization(body, date),
            }
            async with session.post(url + PATH, data=body, headers=headers) as resp:
                orjson.loads(await resp.read())
                failed += resp.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency, ssl=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        for rec in records:
            await queue.put(rec)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    if failed:
        raise SystemExit(f"{failed} requests failed")


if __name__ == "__main__":
    uvloop.run(main())
