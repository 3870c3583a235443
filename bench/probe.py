"""`python -m bench.probe`: Rill exactly as `python -m server` runs it, plus a look inside
for the soak (bench/soak.py), so the product itself carries no debugging hooks.

SIGUSR1 appends one JSON line to $BENCH_PROBE_FILE: glibc's heap (mallinfo2: what
malloc holds from the system, what is in use, what is free inside it), pymalloc's
arenas, live objects the collector tracks (cyclic garbage included), and RSS. SIGUSR2
does the same with a count of objects by type, then runs a full collection and
malloc_trim(0) and appends a second line: what that gives back tells garbage waiting
for the collector, and free-but-held heap (fragmentation), from memory really in use. The handlers run
on the main thread between two bytecodes (no thread of its own: a thread would get
its own malloc arena and change what is measured)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

_MALLINFO_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (*_MALLINFO_FIELDS, "keepcost")]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)  # glibc 2.33 and later
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2
_malloc_trim = getattr(_libc, "malloc_trim", None)


def status_kb(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM… from /proc/<pid>/status, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith(" kB"):
            values[name] = int(rest.split()[0])
    return values


_PYMALLOC_LINES = {
    "# arenas allocated current": "arenas",
    "# bytes in allocated blocks": "allocated",
    "# bytes in available blocks": "available",
}


def pymalloc_stats() -> dict[str, int]:
    """pymalloc's 1 MiB arenas (mmapped, outside glibc's heap): how many, and the bytes of
    their blocks in use and free. sys._debugmallocstats() writes to fd 2: borrowed here."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if (key := _PYMALLOC_LINES.get(name.strip())) is not None:
            stats[key] = int(value.strip().replace(",", ""))
    return stats


def snapshot(label: str) -> dict[str, Any]:
    status = status_kb()
    sample: dict[str, Any] = {
        "label": label,
        "t": time.monotonic(),
        "rss_kb": status["VmRSS"],
        "anon_kb": status["RssAnon"],
        "pymalloc_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "gc_frozen": gc.get_freeze_count(),
        "gc_collections": [generation["collections"] for generation in gc.get_stats()],
        "pymalloc": pymalloc_stats(),
    }
    if _mallinfo2 is not None:
        info = _mallinfo2()
        sample["malloc"] = {name: getattr(info, name) for name in (*_MALLINFO_FIELDS, "keepcost")}
    return sample


def _write(path: Path, sample: dict[str, Any]) -> None:
    with path.open("a") as file:
        file.write(json.dumps(sample) + "\n")


def install(path: Path) -> None:
    def on_sample(_signal: int, _frame: FrameType | None) -> None:
        _write(path, snapshot("sample"))

    def on_trim(_signal: int, _frame: FrameType | None) -> None:
        before = snapshot("before_trim")
        kinds = Counter(type(o).__qualname__ for o in gc.get_objects())
        before["types"] = dict(kinds.most_common(40))
        _write(path, before)
        collected = gc.collect()  # garbage in cycles that was waiting for a full collection
        if _malloc_trim is not None:
            _malloc_trim(0)
        after = snapshot("after_trim")
        after["collected"] = collected
        _write(path, after)

    signal.signal(signal.SIGUSR1, on_sample)
    signal.signal(signal.SIGUSR2, on_trim)


def main() -> int:
    from server.__main__ import main as serve

    install(Path(os.environ["BENCH_PROBE_FILE"]))
    return serve()


if __name__ == "__main__":
    sys.exit(main())
