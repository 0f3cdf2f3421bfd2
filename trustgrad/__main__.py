import logging
import os
import sys

from trustgrad.cli import main
from trustgrad.launch import under_torchrun

code = main()
if under_torchrun():
    # A torchrun rank ends here without the interpreter's finalization: its work is done (records written, report
    # published), and finalization aborted ranks at random ("terminate called without an active exception", no Python
    # frame left; measured on 1 of 5 local-sgd runs of one rank per network namespace), turning a finished rank into
    # a failed one in torchrun's eyes (docs/multihost.md, "Errors").
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
