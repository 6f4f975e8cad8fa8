"""Moved to :mod:`core.dist` (the bottom layer, so that losses/ and models/ need not import engine/); this name stays
for code that imports it from here."""
from core.dist import (all_gather_cat, all_reduce_mean, all_reduce_sum, barrier, broadcast_object,  # noqa: F401
                       check_global_batch, init_from_env, is_initialized, is_main, rank, shutdown, world_size, wrap_ddp)
