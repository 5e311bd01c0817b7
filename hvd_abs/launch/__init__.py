"""The launcher side: what starts and drives the workers. horovod (the horovodrun command and
its outcome), discovery (the hosts horovodrun may use now), standby and warm_exec (warm joins),
ray_executor (Horovod on Ray). Nothing in the training core or the worker side imports it."""
