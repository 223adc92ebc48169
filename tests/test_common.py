"""common.py: the allocator setting the CLI applies (keep_freed_memory)."""
import resource
import sys

import pytest
import torch

from sputnik.common import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_repeated_large_temporaries():
    """Without it glibc hands 16 MB blocks back to the kernel and every new one page-faults in
    (4096 faults for 16 MB); with it the freed heap is reused."""
    assert keep_freed_memory()
    x = torch.randn(1024, 4096)
    for _ in range(8):  # grow the heap to its working size (memalign fragments it for a few rounds)
        a, b = x.exp(), x.exp()
        del a, b
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        a, b = x.exp(), x.exp()
        del a, b
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000, f"{faults} page faults for 10 reused 16 MB temporaries"
