"""Run under horovodrun: each rank contributes rank + 1, prints the allreduced sum."""
import horovod.torch as hvd
import torch

hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
print(f"rank={hvd.rank()} size={hvd.size()} sum={total.item():g}", flush=True)
hvd.shutdown()
