"""`tandem`: one console script, one subcommand per program.

Each subcommand's module is imported only when chosen, so `tandem gateway` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("services.engine.generate_cli", "run prompts through the engine, offline"),
}


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
    module = importlib.import_module(command[0])
    return int(module.main(args[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
