"""The glibc malloc setting the CLI and the node apply (hqsmem_ros/malloc_tuning.py)."""
import platform
import subprocess
import sys

PROBE = r'''
import ctypes, ctypes.util, sys
from hqsmem_ros.malloc_tuning import reuse_large_buffers
applied = reuse_large_buffers() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
held = libc.mallinfo2().hblks
p = libc.malloc(3 << 20)  # a 640x480 rgb8 frame and then some
own_mmaps = libc.mallinfo2().hblks - held
libc.free(p)
print(applied, own_mmaps)
'''


def _probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, own_mmaps = out.stdout.split()
    return applied, int(own_mmaps)


def test_a_fresh_megabyte_block_comes_from_the_heap_once_the_setting_is_applied():
    assert platform.libc_ver()[0] == "glibc"  # Debian/Ubuntu, the supported platforms
    assert _probe("default") == ("None", 1)  # glibc's default: a block this size gets its own mmap
    assert _probe("tuned") == ("True", 0)
