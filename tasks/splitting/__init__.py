"""Leak-free splits: by time or leave-one-out, in one process or shard by shard."""
