"""The launcher side: what starts and drives the workers. horovod (the horovodrun command),
args (the train arguments a launcher checks and rewrites), outcome (how a job ended), job_lock,
discovery (the hosts horovodrun may use now), hosts (the pool's interface, ssh and checks),
horovodrun (Horovod's launcher for a pool beyond this machine), job_service (the workers'
requests, from any host), standby and warm_exec (warm joins), ray_executor
with ray_discovery, ray_warm_pool, ray_workers, ray_address (Horovod on Ray). Nothing in the
training core or the worker side imports it."""
