"""``python -m gd_cli`` is the ``gd`` program (use this form under ``torchrun``)."""

import sys

from gd_cli.main import main

if __name__ == "__main__":
    sys.exit(main())
