"""`python -m liveserve.cli`, as `liveserve`."""

import sys

from liveserve.cli.app import main

sys.exit(main())
