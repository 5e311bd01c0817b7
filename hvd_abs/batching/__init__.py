"""Batch-size machinery: the growth controller, the LR as a function of state, and the layout of a
global batch over workers, micro-batches and accumulation steps. Pure Python/torch-free state."""
from hvd_abs.batching.controller import BatchController, Decision
from hvd_abs.batching.layout import Layout, layout, plan, wanted_world_size
from hvd_abs.batching.lr import LRSchedule

__all__ = ["BatchController", "Decision", "LRSchedule", "Layout", "layout", "plan", "wanted_world_size"]
