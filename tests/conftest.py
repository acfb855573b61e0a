"""Shared fixtures. Tests that import huaweicloudsdkcore get a throwaway HOME: importing it
writes ~/.huaweicloud/application_id."""

from __future__ import annotations

import os
import tempfile

# Before any test module imports the SDK.
os.environ["HOME"] = tempfile.mkdtemp(prefix="bulksend-home-")
