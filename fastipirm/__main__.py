"""``python -m fastipirm`` (and ``torchrun ... -m fastipirm``)."""
import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun rank has finished (its process group is destroyed) and flushed its output:
    # leave without running the interpreter's teardown, where gloo's threads can end in
    # std::terminate ("terminate called without an active exception") after a good run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
