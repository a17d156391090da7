"""`tandem`: one console script, one subcommand per program.

Each subcommand's module is imported only when chosen, so `tandem gateway` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> ("module" with `main(argv) -> int`, or "module:function"; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("services.engine.generate_cli", "run prompts through the engine, offline"),
    "serve": ("services.cli:serve", "run a worker: unified (null), prefill or decode"),
    "gateway": ("services.gateway.__main__", "the OpenAI-compatible HTTP gateway and PD router"),
    "kvd": ("services.kvd.__main__", "run the node's KV daemon (workers start one if needed)"),
    "stack": ("services.stack", "kvd, prefill, decode and gateway together on this machine"),
    "profile": ("services.profile_cli", "start/stop the torch profiler on workers"),
    "bench": ("services.bench.__main__", "benchmark a server: latency percentiles, goodput"),
}

# --disaggregation-mode -> the package whose __main__ serves it
SERVE_MODES = {"null": "services.decode", "decode": "services.decode",
               "prefill": "services.prefill"}


def serve(argv: list[str]) -> int:
    """`tandem serve`: pick the worker package by --disaggregation-mode; it parses the rest."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--disaggregation-mode", default="null")
    mode = pre.parse_known_args(argv)[0].disaggregation_mode
    package = SERVE_MODES.get(mode, "services.decode")  # its parser rejects unknown modes
    if importlib.util.find_spec(package) is None:
        print(f"tandem serve: error: --disaggregation-mode {mode} is not available: "
              f"{package} is not installed", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"{package}.__main__").main(argv))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: tandem <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"tandem: unknown command {args[0]!r}; try `tandem --help`", file=sys.stderr)
        return 2
    module_name, _, function = command[0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(args[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
