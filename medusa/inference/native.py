"""The native runtimes under torch's CPU work, and the two things a long-running engine thread needs from them.

OpenMP teams: GNU libgomp (torch's OpenMP on Linux) keeps a team of helper threads for every thread that has
run a parallel region, for as long as that thread lives. Idle helpers spin a while before they sleep, but only
while libgomp manages no more threads than there are CPUs; past that they sleep at once, and each of a decode
step's hundreds of small parallel regions waits for its helpers to be woken. A model loaded on the main thread
and decoded on a worker thread makes two teams, and on a 2-core machine the worker then decodes at about half
the speed of the main thread. `release_team()` ends the calling thread's team (OpenMP 5's
`omp_pause_resource_all`), so the worker's team is the only one; the caller gets a new team if it runs a
parallel region again. Other OpenMP runtimes (LLVM's libomp, Intel's) have no such rule and are left alone.

The heap: torch's CPU tensors come from malloc, and glibc keeps what a busy batch freed (KV caches, a step's
activations) in its arenas rather than giving it back, so a server idle after a burst stays at the burst's
size. `release_heap()` hands the free pages back (`malloc_trim`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

OMP_PAUSE_SOFT = 1


@functools.cache
def _libgomp() -> tuple[ctypes.CDLL, ...]:
    """The libgomp copies this process has loaded (torch's wheel ships its own), found in /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    paths = {parts[5] for parts in (line.split(maxsplit=5) for line in maps.splitlines()) if len(parts) == 6}
    found = []
    for path in sorted(p for p in paths if os.path.basename(p).startswith("libgomp")):
        try:
            lib = ctypes.CDLL(path)           # the library already mapped: dlopen hands back the same copy
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):     # gone, or a libgomp older than OpenMP 5 (GCC 9)
            continue
        found.append(lib)
    return tuple(found)


def release_team() -> bool:
    """End the OpenMP team of the calling thread (call it outside any parallel region). True when a libgomp
    was found and did so; False where there is none (another runtime, no /proc) and nothing was done."""
    import torch  # noqa: F401  (loads torch's libgomp, so that it is found)

    done = False
    for lib in _libgomp():
        done = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0 or done
    return done


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library: musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's arenas, all of them). True where glibc did;
    False where there is no glibc and nothing was done."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
