"""Where imagelm keeps what it can recompute: $IMAGELM_CACHE, by default ~/.cache/imagelm
(baselines' probe results, the indexes of interleaved corpora)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    return Path(os.environ.get("IMAGELM_CACHE", "~/.cache/imagelm")).expanduser() / kind


def files_key(*parts, files: list[str]) -> str:
    """A digest of `parts` and of each file's absolute path, size and modification time: a file
    rewritten, grown or replaced changes it."""
    h = hashlib.sha256(repr(parts).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]
