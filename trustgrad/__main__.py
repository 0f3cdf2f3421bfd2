import sys

from trustgrad.cli import main

sys.exit(main())
