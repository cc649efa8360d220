import sys

from liveserve.cli import main

sys.exit(main())
