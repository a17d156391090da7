"""The decode / unified worker's configuration: `tandem serve`'s `ServeConfig`, and the modes
this package serves.

`load_config(argv)` parses and validates without importing torch, so a bad flag fails in a
fraction of a second with a one-line message.
"""

from __future__ import annotations

from services.common.serve_config import ServeConfig, parse_serve_args

__all__ = ["ServeConfig", "check_mode", "load_config"]


def check_mode(config: ServeConfig) -> None:
    """ValueError for a mode this package does not serve (yet)."""
    if config.disaggregation_mode == "prefill":
        raise ValueError("--disaggregation-mode prefill is served by services.prefill, "
                         "not the decode worker")


def load_config(argv: list[str]) -> ServeConfig:
    config = parse_serve_args(argv)
    check_mode(config)
    return config
