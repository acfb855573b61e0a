"""The official SDK sending N messages: sync (one thread) or with a thread pool.

python benchmarks/sdk_sender.py URL N THREADS
"""

from __future__ import annotations

import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

os.environ["HOME"] = tempfile.mkdtemp()  # importing huaweicloudsdkcore writes ~/.huaweicloud

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkrocketmq.v2 import (
    RocketMQClient,
    SendMessageProperties,
    SendMessageReq,
    SendMessageRequest,
)


def main() -> None:
    url, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    creds = BasicCredentials(
        os.environ["HUAWEICLOUD_SDK_AK"], os.environ["HUAWEICLOUD_SDK_SK"], "bench-project"
    )
    client = RocketMQClient.new_builder().with_credentials(creds).with_endpoint(url).build()
    body = "x" * 256

    def send(i: int) -> None:
        req = SendMessageRequest(
            engine="rocketmq",
            instance_id="bench-instance",
            body=SendMessageReq(
                topic="bench",
                body=body,
                property_list=[SendMessageProperties(name="KEYS", value=f"k{i}")],
            ),
        )
        client.send_message(req)

    if threads <= 1:
        for i in range(n):
            send(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(send, range(n)))


if __name__ == "__main__":
    main()
