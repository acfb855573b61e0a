"""The scale-out flags of ``bulksend send`` and ``bulksend load`` (``--workers``,
``--cluster``, ``--shards``). Kept apart from the driver so that parsing them loads
neither Dask nor the driver: a command imports ``bulksend.scaleout`` (and with it
``bulksend.cluster`` and Dask) only when a flag asks for a cluster."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from bulksend.cli.options import Resolver
from bulksend.errors import ConfigError
from bulksend.shards import ClusterSpec


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (Dask)")
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run on a Dask LocalCluster of N single-threaded worker processes on 127.0.0.1",
    )
    g.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run on the Dask scheduler at ADDRESS (e.g. tcp://10.0.0.5:8786)",
    )
    g.add_argument(
        "--shards",
        type=int,
        metavar="M",
        help="split the job into M shards (default: one per worker thread)",
    )
    g.add_argument(
        "--segment-interval",
        type=float,
        metavar="SECONDS",
        help="with --out s3://...: seconds between a shard's uploads of its new ledger lines"
        " (default 5; a lost worker's un-uploaded lines are sent again)",
    )


def resolve_cluster(args: argparse.Namespace, env: Mapping[str, str]) -> ClusterSpec | None:
    """The ClusterSpec the flags (or BULKSEND_WORKERS / _CLUSTER / _SHARDS, or the config
    file) ask for; None for an ordinary single-process run."""
    r = Resolver.build(args, env)
    out = r.get("out", str, None)
    # Refused only when given on the command line: from the environment or a config file
    # it is a default for the runs that upload, harmless to the others. (A URL is told by
    # its "://", as remote.is_url does: that module would load the harness here.)
    if getattr(args, "segment_interval", None) is not None and "://" not in (out or ""):
        raise ConfigError(
            "--segment-interval paces a shard's uploads to --out s3://... (send --workers/"
            "--cluster); this run uploads nothing: leave it out"
        )
    workers = r.get("workers", int, None)
    address = r.get("cluster", str, None)
    shards = r.get("shards", int, None)
    if workers is None and address is None:
        if shards is not None:
            raise ConfigError("--shards needs --workers N or --cluster ADDRESS")
        return None
    interval = r.get("segment_interval", float, 5.0)
    return ClusterSpec(workers=workers, address=address, shards=shards, segment_interval_s=interval)
