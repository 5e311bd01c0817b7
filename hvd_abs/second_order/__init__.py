"""Second-order machinery: Hessian-vector products, eigenvalues, trace. No Horovod import here.

- :func:`hvp` / :class:`HessianOperator`: exact H v of the mean loss (three methods).
- :func:`top_eigenvalues`: top-k by thick-restart Lanczos (default) or power iteration with deflation.
- :func:`hessian_trace`: Hutchinson estimate with its standard error.
- :func:`hessian_density`: the spectral density by stochastic Lanczos quadrature.
- :mod:`~hvd_abs.second_order.vecops`: the Krylov vector ops (native extension, foreach, loop).

Each estimator runs the model in eval() mode and leaves its mode, buffers and ``.grad`` as they
were; with Horovod initialised and more than one worker, the samples are sharded across workers.
"""
from hvd_abs.second_order.comm import Comm, SingleProcess
from hvd_abs.second_order.density import DensityResult, hessian_density
from hvd_abs.second_order.eigen import EigenResult, TraceResult, hessian_trace, top_eigenvalues
from hvd_abs.second_order.hvp import HessianOperator, hvp, preserved_state, trainable_parameters

__all__ = [
    "Comm", "DensityResult", "EigenResult", "HessianOperator", "SingleProcess", "TraceResult", "hessian_density", "hessian_trace", "hvp",
    "preserved_state", "top_eigenvalues", "trainable_parameters",
]
