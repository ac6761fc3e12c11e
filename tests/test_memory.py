"""ptoc.keep_freed_memory: freed blocks stay mapped for the next arrays (glibc)."""

import platform
import subprocess
import sys

import pytest

import ptoc

_SCRIPT = """
import ctypes, ctypes.util, sys
import numpy as np
import ptoc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert ptoc.keep_freed_memory(64 << 20) is True
a = [np.ones(1 << 20) for _ in range(2)]  # two 8 MiB blocks, as forward's states and sigma'
del a
info = libc.mallinfo2()
print(info.fordblks, info.hblkhd)
"""


def _freed_and_mapped(mode):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         timeout=120, check=True)
    free_heap, mapped = (int(v) for v in out.stdout.split())
    return free_heap, mapped


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_stay_mapped_only_when_asked():
    # glibc's defaults: the two 8 MiB blocks are unmapped (or the heap top trimmed) when
    # freed; with keep_freed_memory they stay in the heap, free for the next arrays
    free_default, _ = _freed_and_mapped("default")
    free_kept, mapped_kept = _freed_and_mapped("keep")
    assert free_default < 8 << 20
    assert free_kept >= 16 << 20 and mapped_kept < 8 << 20


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_keep_freed_memory_refuses_a_bad_size(bad):
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 1"):
        ptoc.keep_freed_memory(bad)
