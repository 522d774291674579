"""Argument parsing shared by every `embedq` subcommand: one-line errors, defaults in --help, checked numbers."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any, NoReturn

from producer.cli import exitcodes

#: argparse says "argument --workers: 0: must be ..."; users typed "--workers 0".
_ARGUMENT_PREFIX = re.compile(r"^argument ([^:]+): (?=\S+: )")
_INVALID_CHOICE = re.compile(r"^argument ([^:]+): invalid choice: '?(.*?)'? \(choose from (.*)\)$")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and whose --help ends with exit codes.

    Subparsers inherit the class, so every subcommand behaves the same.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("epilog", exitcodes.epilog())
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        message = _INVALID_CHOICE.sub(lambda m: f"{m[1]} {m[2]}: choose one of {m[3].replace(chr(39), '')}", message)
        message = _ARGUMENT_PREFIX.sub(r"\1 ", message).removeprefix("argument ")
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every flag that has a meaningful default; keeps the exit-code table as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
        ):
            return text
        return f"{text} (default: %(default)s)"


def number(kind: type[int] | type[float], *, minimum: float, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` that must be >= minimum (or > minimum), else a one-line reason."""
    noun = "a whole number" if kind is int else "a number"
    bound = f"at least {minimum:g}" if inclusive else f"more than {minimum:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {noun}") from None
        if value != value or (value < minimum if inclusive else value <= minimum):  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


positive_int = number(int, minimum=1)
non_negative_int = number(int, minimum=0)
positive_float = number(float, minimum=0, inclusive=False)
non_negative_float = number(float, minimum=0)


def port(text: str) -> int:
    """An argparse type for a TCP port, 1-65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is at most 65535")
    return int(value)
