import sys

from sweeper.cli import main

if __name__ == "__main__":  # multiprocessing imports this module again in forked workers
    sys.exit(main())
