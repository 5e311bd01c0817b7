"""The elastic layer: state commits, the world-size signal, host discovery, disk checkpoints.

Nothing here imports Horovod at module level: `runner` imports it inside its functions, and
`discovery` / `world_signal` use the standard library only, because the discovery script runs
them in a fresh interpreter every second.
"""
