"""One content key per sample, however it is padded or batched: the decision log's sample ids
and the reference guard's cache keys are both :func:`content_key`. Pure Python."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def content_key(tokens: Iterable[int], positions: Iterable[int] | None = None) -> str:
    """16 hex digits of BLAKE2b over the token ids (comma-separated) and, when given, ``|`` and the
    positions (comma-separated). The same content gives the same key in any process, run or
    machine."""
    data = ",".join(str(int(t)) for t in tokens)
    if positions is not None:
        data += "|" + ",".join(str(int(p)) for p in positions)
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()
