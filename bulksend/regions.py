"""Huawei Cloud regions where DMS for RocketMQ runs, and each one's API endpoint.

The table is the official SDK's (huaweicloudsdkrocketmq 3.1.219, ``RocketMQRegion``); a
test checks it against the installed SDK. A region missing here is still reachable with
``--endpoint URL``. A region id that is not in the table is refused up front, with the
closest known id suggested, instead of every record failing on a host that does not exist.
"""

from __future__ import annotations

import difflib

from bulksend.errors import ConfigError

#: Region id -> the DMS API endpoint there.
DMS_ENDPOINTS: dict[str, str] = {
    region: f"https://dms.{region}.myhuaweicloud.com"
    for region in (
        "af-north-1",
        "af-south-1",
        "ae-ad-1",
        "ap-southeast-1",
        "ap-southeast-2",
        "ap-southeast-3",
        "ap-southeast-4",
        "ap-southeast-5",
        "cn-east-2",
        "cn-east-3",
        "cn-east-4",
        "cn-east-5",
        "cn-north-1",
        "cn-north-2",
        "cn-north-4",
        "cn-north-9",
        "cn-north-11",
        "cn-north-12",
        "cn-south-1",
        "cn-south-2",
        "cn-south-4",
        "cn-southwest-2",
        "cn-southwest-3",
        "eu-west-0",
        "la-north-2",
        "la-south-2",
        "me-east-1",
        "my-kualalumpur-1",
        "na-mexico-1",
        "ru-moscow-1",
        "ru-northwest-2",
        "sa-brazil-1",
        "tr-west-1",
    )
}
# Huawei Cloud Europe (Dublin) lives under its own domain.
DMS_ENDPOINTS["eu-west-101"] = "https://dms.eu-west-101.myhuaweicloud.eu"


def region_endpoint(region: str) -> str:
    """The DMS endpoint of a known region; ConfigError (one line, a suggestion) otherwise."""
    try:
        return DMS_ENDPOINTS[region]
    except KeyError:
        pass
    close = difflib.get_close_matches(region.strip().lower(), DMS_ENDPOINTS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        f"unknown region {region!r}{hint}; for a region bulksend does not know, "
        "give its endpoint with --endpoint URL"
    )
