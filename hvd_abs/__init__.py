"""hvd_abs: elastic adaptive-batch-size (ABS/ABSA) training of PyTorch models on Horovod.

Importing the package imports neither Horovod nor Ray: those live at the edges
(hvd_abs.elastic, hvd_abs.launch) and are imported only where used.
"""
__version__ = "0.1.0"
