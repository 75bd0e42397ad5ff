"""The `export-engine` command.

    export-engine MODEL --w4a4 [...]     the whole pipeline (load -> ... -> verify)
    export-engine quantize MODEL --w4a4  one stage
    export-engine list                   models, targets, formats

Errors a user can fix are raised as :class:`UserError` and printed as one line
(no traceback) with a documented exit code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

#: exit codes (documented in README.md)
EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT, EXIT_MISSING_TOOL, EXIT_TOLERANCE = 0, 2, 3, 4, 5, 6


class UserError(Exception):
    """A problem with the user's input or environment; ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int = EXIT_INPUT):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # keeps the exit code when raised in a stage's child process
        return type(self), (str(self), self.exit_code)


def _cmd_list(args: argparse.Namespace) -> int:
    from .formats import KNOWN_FORMATS, get_format

    print("formats (any [u]eXmY with 2..8 bits and [u]intN also work):")
    for name in KNOWN_FORMATS:
        f = get_format(name)
        print(f"  {name:6s} {f.bits} bits  {'signed  ' if f.signed else 'unsigned'}  max {f.max:g}")
    try:
        from .models import PRESETS
    except ImportError:
        PRESETS = {}
    if PRESETS:
        print("models:")
        for name, preset in PRESETS.items():
            print(f"  {name:10s} {preset.description}")
    return EXIT_OK


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list models, targets and number formats")
    p.set_defaults(func=_cmd_list)


#: subcommand registrars: each adds its parser and sets ``func``
SUBCOMMANDS: dict[str, Callable] = {"list": _add_list}


def _register_optional(sub) -> None:
    """Stages register themselves here as they exist (quantize, export, build, verify)."""
    for module_name in ("quantize_cli", "export_cli", "pipeline_cli"):
        try:
            module = __import__(f"exporter.{module_name}", fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-engine",
        usage="export-engine MODEL --w4a4 [options]   (the whole pipeline; see `export-engine run -h`)\n"
              "       export-engine COMMAND [options]",
        description="4-bit FP (MSFP) quantization of diffusion UNets, ONNX export and TensorRT engines.",
        epilog="Start with: export-engine sdxl-tiny --w4a4 --no-build   (seconds on a CPU), then "
               "export-engine sdxl --w4a4. Exit codes: 0 ok, 2 usage, 3 bad input, 4 output not "
               "writable, 5 TensorRT missing, 6 over tolerance.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS.values():
        register(sub)
    _register_optional(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse has no API)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        argv = ["run"] + argv  # `export-engine MODEL --w4a4 ...` is the main job
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except UserError as err:
        print(f"export-engine: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("export-engine: interrupted; finished stages are kept, partial files were discarded",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
