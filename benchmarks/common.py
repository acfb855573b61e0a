"""Shared pieces of the benchmark scripts: a local nginx that answers like SendMessage,
input files, and measuring a child process's wall time, CPU time and peak RSS."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

ANSWER = (
    '{"topic":"bench","body":"x","property_list":[],"msg_id":"0123456789ABCDEF0123456789ABCDEF",'
    '"queue_id":0,"queue_offset":0,"broker_name":"broker-0"}'
)

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log crit;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            add_header X-Request-Id $request_id;
            return 200 '{answer}';
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_debian_package(binary: str, package: str) -> str:
    found = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None
    )
    if found:
        return found
    print(f"installing {package} (Debian) ...", file=sys.stderr)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", package],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which(binary) or f"/usr/sbin/{binary}"


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA (trustme) and a certificate for 127.0.0.1 it signed: the server's PEM
    (key and chain) and the CA's PEM for the client's --ca-bundle."""
    import trustme

    ca = trustme.CA()
    server, bundle = directory / "server.pem", directory / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server))
    ca.cert_pem.write_to_path(str(bundle))
    return server, bundle


@contextmanager
def nginx(core: int = 1, tls: Path | None = None) -> Iterator[str]:
    """nginx on one core answering every request with a SendMessage-shaped 200; over TLS
    with ``tls`` (a PEM holding the key and the certificate chain)."""
    binary = ensure_debian_package("nginx", "nginx-light")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as d:
        conf = Path(d) / "nginx.conf"
        text = NGINX_CONF.format(dir=d, port=port, answer=ANSWER)
        if tls is not None:
            text = text.replace(
                f"listen 127.0.0.1:{port};",
                f"listen 127.0.0.1:{port} ssl;\n        ssl_certificate {tls};\n"
                f"        ssl_certificate_key {tls};",
            )
        conf.write_text(text)
        proc = subprocess.Popen(["taskset", "-c", str(core), binary, "-c", str(conf), "-p", d])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def write_messages(path: Path, n: int, body_size: int = 256, topic: str = "bench") -> None:
    body = "x" * body_size
    with path.open("wb") as fh:
        for i in range(n):
            fh.write(
                orjson.dumps({"topic": topic, "body": body, "keys": f"k{i}", "id": f"r{i}"}) + b"\n"
            )


@dataclass
class Measured:
    name: str
    messages: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    #: What the command printed (its last line, our wrapper's figures, left out).
    output: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_s / self.messages * 1e6


def measure(
    name: str,
    cmd: Sequence[str],
    messages: int,
    env: dict[str, str] | None = None,
    *,
    ok_codes: tuple[int, ...] = (0,),
) -> Measured:
    """Run cmd to completion; wall time, user+sys CPU and peak RSS of that child alone."""
    # RUSAGE_CHILDREN accumulates (and ru_maxrss is the max over all children), so each
    # measurement runs in a fresh wrapper process that reports its own child's usage.
    wrapper = (
        "import resource,subprocess,sys,time,json;t=time.perf_counter();"
        "rc=subprocess.call(sys.argv[1:]);w=time.perf_counter()-t;"
        "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(json.dumps([rc,w,u.ru_utime+u.ru_stime,u.ru_maxrss/1024]))"
    )
    lines = (
        subprocess.run(
            [sys.executable, "-c", wrapper, *cmd],
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    rc, wall, cpu, rss = orjson.loads(lines[-1])
    if rc not in ok_codes:
        raise SystemExit(f"{name}: exited {rc}")
    return Measured(name, messages, wall, cpu, rss, "\n".join(lines[:-1]))


def table(rows: Sequence[Measured], baseline: Measured) -> str:
    lines = [
        f"{'':28} {'messages':>9} {'msg/s':>9} {'CPU µs/msg':>11} {'peak RSS MB':>12} {'CPU vs ' + baseline.name:>18}"
    ]
    for r in rows:
        ratio = baseline.cpu_us_per_msg / r.cpu_us_per_msg
        lines.append(
            f"{r.name:28} {r.messages:>9,} {r.rate:>9,.0f} {r.cpu_us_per_msg:>11.1f} {r.peak_rss_mb:>12.1f} {ratio:>17.1f}x"
        )
    return "\n".join(lines)
