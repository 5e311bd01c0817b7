"""`hvd-abs train`: SGD / ABS / ABSA training on one process or under horovodrun (the command
itself is the worker's: hvd_abs/elastic/worker.py)."""
from hvd_abs.elastic.worker import command

__all__ = ["command"]
