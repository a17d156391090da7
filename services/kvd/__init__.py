"""kvd: the per-node KV daemon (pool memory, transfers, page accounting)."""
