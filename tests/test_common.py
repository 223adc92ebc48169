"""common.py: the allocator setting the CLI applies (keep_freed_memory)."""
import subprocess
import sys
import textwrap

import pytest

# Faults while 48 MB temporaries (a [3072, 4096] fp32 logits block) are made and freed again and
# again, after the heap has had a few rounds to reach its working size (posix_memalign fragments it
# at first). glibc's default serves blocks this large with fresh mmaps however often they recur.
# Run in fresh processes: the setting is process-wide and must not leak into (or depend on) the
# test process.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from sputnik.common import keep_freed_memory
        assert keep_freed_memory()
    x = torch.randn(3072, 4096)  # 48 MB: above glibc's largest automatic mmap threshold (32 MB)
    for _ in range(12):
        a, b = x.exp(), x.exp()
        del a, b
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        a, b = x.exp(), x.exp()
        del a, b
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_repeated_large_temporaries():
    """glibc's default hands the block back to the kernel at each free and each new one page-faults
    in (12,288 faults per 48 MB: ~123k for these 10 temporaries); with the setting the heap keeps it."""
    default, kept = _faults("default"), _faults("keep")
    assert kept < max(1000, default / 4), (default, kept)
