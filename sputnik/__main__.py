import atexit
import logging
import os
import sys

from sputnik.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker whose process group is already destroyed (train/session.process): leave
    # without the interpreter's finalization, where torch's gloo objects now and then abort a worker
    # that has finished its work ("terminate called without an active exception", SIGABRT after the
    # run's last line, no Python frame: 1 in 25-160 two-process runs, LOG.md stop 22) and so fail
    # a finished run. Python's own exit handlers (the reward sandbox's worker) still run.
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
