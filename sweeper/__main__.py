"""``python -m sweeper``: the ``sweeper`` command. Every worker process runs this module too,
forked from the template or fresh (``sweeper.processes``)."""

import sys

from sweeper.cli import main

if __name__ == "__main__":  # not when multiprocessing imports it again, as __mp_main__, in a child
    sys.exit(main())
