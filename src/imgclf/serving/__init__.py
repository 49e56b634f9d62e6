"""Deployment: the REST service (``imgclf serve``) with its micro-batcher and web page."""
