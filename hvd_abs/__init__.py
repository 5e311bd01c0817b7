"""hvd_abs: elastic adaptive-batch-size (ABS/ABSA) training of PyTorch models on Horovod.

Importing the package imports neither Horovod nor Ray: those live at the edges
(hvd_abs.elastic, hvd_abs.launch) and are imported only where used. The library entry for your
own model and data (hvd_abs/api.py) loads on first use, so `hvd-abs --help` stays fast.
"""
__version__ = "0.1.0"

_API = {
    "fit": "hvd_abs.api", "parse_train_args": "hvd_abs.api", "splits_from_tensors": "hvd_abs.api",
    "splits_from_datasets": "hvd_abs.api", "load_model": "hvd_abs.api",
    "TrainConfig": "hvd_abs.training.config", "Callback": "hvd_abs.training.events",
    "Event": "hvd_abs.training.events", "Splits": "hvd_abs.data",
    "load_dataset": "hvd_abs.data",
    "UserError": "hvd_abs.errors", "user_errors_exit_2": "hvd_abs.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'hvd_abs' has no attribute {name!r}")
