"""The worker side: what runs inside a worker. worker (`hvd-abs train`'s entry, run_train),
job (the session inside Horovod's elastic loop), hvd_runner (the state commit), world_signal
(the world size the job wants, read by the launcher's discovery), job_channel (requests to the
launcher from any host), outputs_relay (rank 0's files, written on the launcher's host).

Nothing here imports Horovod at module level, and `world_signal` and `job_channel` use the standard library only:
the discovery script imports it in a fresh interpreter every second.
"""
