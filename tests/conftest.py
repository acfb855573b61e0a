"""Shared fixtures. Tests that import huaweicloudsdkcore get a throwaway HOME: importing it
writes ~/.huaweicloud/application_id. No test may ask a real ECS metadata service (a CI
runner may itself be an ECS): BULKSEND_METADATA_URL=off, inherited by every subprocess;
the tests of the metadata lookup name a stand-in on 127.0.0.1 instead."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# Before any test module imports the SDK.
os.environ["HOME"] = tempfile.mkdtemp(prefix="bulksend-home-")
# Removed when the session ends, so runs do not pile throwaway homes up in /tmp.
atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)
os.environ["BULKSEND_METADATA_URL"] = "off"


@pytest.fixture(autouse=True)
def _no_sender_left_behind() -> Iterator[None]:
    """A failed assertion must not leave a sender (``spawn_send``) running past its test."""
    yield
    # Imported here: the environment above is set before any bulksend module loads.
    from tests.cli_helpers import reap_spawned

    reap_spawned()
