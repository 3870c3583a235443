"""glibc malloc settings for a long-running Rill.

glibc raises its mmap threshold to the size of any large block freed (up to 32 MiB),
and its trim threshold to twice that. Signing in one access token's cookie key takes
a 16 MiB scrypt buffer (server/access/gate.py), so from the second token on such buffers come
from the heap and stay there: +16 MiB of RSS from start-up, for good, and the heap is
given back only once 32 MiB at its top are free, which fragmentation makes rare.
Pinning both thresholds at glibc's own defaults turns that adjustment off."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's defaults for both, before it adjusts them
# An operator's own choice (glibc reads these at start-up) is left alone.
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def pin_malloc_thresholds(environ: Mapping[str, str] = os.environ) -> bool:
    """Fixes glibc's mmap and trim thresholds; False where that does not apply (another
    C library, or the operator set them). Call before anything large is allocated."""
    if any(name in environ for name in _OPERATOR_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    pinned = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1)
    if not pinned:
        log.warning("could not set glibc's malloc thresholds: memory freed may not return to the system")
    return pinned


def tune_collector() -> None:
    """Once start-up is done. What it made lives as long as the process: out of the
    collector's sight, a full collection under load scans only what the streams made
    (28 ms less each). And a full collection stops every stream for as long as it scans
    what they hold (~50 ms at 1,000 streams): ten times rarer than Python's default.
    Garbage in cycles mostly dies young, in the two younger generations, which run as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 100)
