"""The background writer of queued run records: ``python -m imgclf.tracking.writer STORE_URI``."""

import logging
import sys

from imgclf.tracking.store import drain, quick_http

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    with quick_http():  # a server that does not answer: given up within seconds, the records kept queued
        drain(sys.argv[1])
