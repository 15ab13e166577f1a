"""``python -m mmfeatures.report``: the same command as ``mmfeatures report``."""

import sys

from mmfeatures.report.command import main

if __name__ == "__main__":
    sys.exit(main())
