"""The prefill worker's configuration: `tandem serve`'s `ServeConfig` in prefill mode.

`load_config(argv)` parses and validates without importing torch.
"""

from __future__ import annotations

from services.common.serve_config import ServeConfig, parse_serve_args

__all__ = ["ServeConfig", "load_config"]


def load_config(argv: list[str]) -> ServeConfig:
    config = parse_serve_args(argv)
    if config.disaggregation_mode != "prefill":
        raise ValueError(f"--disaggregation-mode {config.disaggregation_mode} is served by "
                         "services.decode, not the prefill worker")
    return config
