"""Record identity: what ``--resume`` matches a record on, across runs and processes.

A record's ``identity`` is its input's key, ``:``, its first physical line (a JSON array
element adds ``:column``, since several may start on one line). The key is
``input_key(path)``: 16 hex digits of the SHA-256 of the input's canonical path, so every
spelling of a path (``day1.jsonl``, ``./day1.jsonl``, ``/data/day1.jsonl``, a symlink) is
one input, and an input named twice in one run is two (its second reading hashes the
occurrence too). Unlike a record's ``id``, which may repeat, an identity is unique per
input record; unlike ``source`` (the path as typed), it does not change with the spelling.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

__all__ = ["canonical_input", "input_key", "input_keys"]


def canonical_input(path: str) -> str:
    """The name of an input that does not depend on how it was typed: the real path
    (absolute, ``.``/``..`` and symlinks resolved), so ``day1.jsonl``, ``./day1.jsonl`` and
    ``/data/day1.jsonl`` are one input. ``-`` (stdin) and a URL (``s3://...``) stay as
    given."""
    if path == "-" or "://" in path:
        return path
    return os.path.realpath(path)


def input_key(path: str, occurrence: int = 1) -> str:
    """The input's part of its records' identities: 16 hex digits of the SHA-256 of
    ``canonical_input(path)`` (and of ``occurrence`` from the second time the same input is
    named in one run, so its records stay distinct from the first reading's).

    A digest, not the path itself: identities are written in every ledger line and held in
    memory by ``--resume``, and 64 bits tell any inputs of a run apart."""
    name = canonical_input(path)
    if occurrence > 1:
        name = f"{name}\n{occurrence}"
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def input_keys(paths: Iterable[str]) -> list[str]:
    """``input_key`` of each of a run's inputs, in order, counting repeats of an input."""
    seen: dict[str, int] = {}
    keys = []
    for path in paths:
        name = canonical_input(path)
        seen[name] = seen.get(name, 0) + 1
        keys.append(input_key(path, seen[name]))
    return keys
