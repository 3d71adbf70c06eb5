"""``python -m fastipirm`` (and ``torchrun ... -m fastipirm``)."""
import os
import sys
import traceback

from .cli import main

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun rank leaves without the interpreter's teardown, where gloo's threads can end in
    # std::terminate ("terminate called without an active exception") after a good run, or
    # wait on a peer after a failed one: its output is flushed, then os._exit. An unexpected
    # error is printed first; torchrun then stops the other ranks.
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(main())
