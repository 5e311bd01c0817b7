"""Second-order machinery: Hessian-vector products, eigenvalues, trace. No Horovod import here."""
