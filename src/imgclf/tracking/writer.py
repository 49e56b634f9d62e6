"""The background writer of queued run records: ``python -m imgclf.tracking.writer STORE_URI``."""

import logging
import sys

from imgclf.tracking.store import drain

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    drain(sys.argv[1])
