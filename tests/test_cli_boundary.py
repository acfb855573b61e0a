"""The CLI's one boundary: a SIGINT before the run's own handlers are in ends with exit 130
and no traceback; an error that quotes a server (an authentication failure) reaches the
terminal with its control characters escaped."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.cli_helpers import no_traceback, target, write_jsonl
from tests.raw_server import Exchange, RawServer, response

pytestmark = pytest.mark.timeout(120)

#: Runs ``python -m bulksend ARGS`` with a SIGINT sent to itself the moment module
#: ``sys.argv[1]`` starts to load: a Ctrl-C at a known point of start-up.
_SIGINT_ON_IMPORT = """
import importlib.abc, os, runpy, signal, sys

# Ctrl-C as a terminal delivers it, even when this test runs where SIGINT is ignored (a
# shell's background job inherits that, and Python then keeps it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
module = sys.argv[1]

class SigintOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintOnImport())
sys.argv = ["bulksend", *sys.argv[2:]]
runpy.run_module("bulksend", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("module", "quiet"),
    [
        ("bulksend.cli", True),  # the program's own modules load
        ("bulksend.cli.load", True),  # the parser is built
        ("bulksend.server.embedded", False),  # in the event loop, the target starting
    ],
)
def test_a_sigint_during_start_up_exits_130_without_a_traceback(
    tmp_path: Path, module: str, quiet: bool
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(50)])
    out = tmp_path / "out.jsonl"
    args = ["send", str(data), "--embedded", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_ON_IMPORT, module, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 130, proc.stderr
    assert no_traceback(proc), proc.stderr
    if quiet:
        assert proc.stderr == "" and not out.exists()
    else:
        # The run had begun (its ledger opened): it says it was interrupted, and how to go on.
        assert "(interrupted)" in proc.stderr and "50 records not sent" in proc.stderr
        assert "--resume" in proc.stderr


NASTY_MSG = "Incorrect IAM authentication information\x1b]0;pwned\x07\x1b[2J\u202e\nsecond line"


@pytest.fixture
async def refusing_server() -> AsyncIterator[str]:
    """Answers every request 401 with an error_msg full of terminal escapes."""
    body = orjson.dumps({"error_code": "APIGW.0301", "error_msg": NASTY_MSG})
    answer = response("401 Unauthorized", body, "Content-Type: application/json")

    async def handle(exchange: Exchange) -> None:
        await exchange.write(answer)

    async with RawServer(handle) as server:
        yield server.url


async def test_an_authentication_failure_prints_the_servers_text_escaped(
    refusing_server: str, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(40)])
    cmd = [sys.executable, "-m", "bulksend", "send", str(data), *target(refusing_server),
           "--quiet", "--concurrency", "1"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2, text
    assert text.startswith("bulksend: error: authentication failed:") and text.count("\n") == 1
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert r"information\x1b]0;pwned\x07\x1b[2J\u202e\nsecond line" in text
