"""Tests of the per-node KV daemon."""
