"""``python -m hifi_fast``: the ``hifi-fast`` command line (see ``hifi_fast.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
