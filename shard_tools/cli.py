"""Command-line conventions shared by every entry point (pack, train, eval), importable without torch.

A usage error is one line on stderr, ``error: ...``, naming the flag and the fix, with exit status 2;
an unrecognised option gets the closest valid one ("did you mean --optim.lr?") instead of a usage dump.
A long loop shows a progress bar on stderr when stderr is a terminal; a command that can take long
ends with a one-line summary on stdout, which is what logs keep.
"""
from __future__ import annotations

import argparse
import difflib
import sys

EXIT_USAGE = 2  # what argparse itself uses for a bad command line


def did_you_mean(name: str, known: list[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``known``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: no usage block, exit status 2, the closest option suggested."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --optim.l must not silently mean --optim.lr
        super().__init__(*args, **kwargs)

    def option_names(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def unrecognized(self, extras: list[str]) -> str:
        """The message for options this parser does not know (the first one gets a suggestion)."""
        first = next((e.split("=")[0] for e in extras if e.startswith("-")), extras[0])
        return (f"unrecognized argument(s) {' '.join(extras)}"
                + did_you_mean(first, self.option_names()))

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self.chosen_command(parsed)
            chosen.error(chosen.unrecognized(extras))
        return parsed

    def chosen_command(self, parsed: argparse.Namespace) -> ArgumentParser:
        """The parser of the sub-command given on the command line (its options are the ones to suggest
        and its --help the one to point at), or this parser when it has none."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)]
        return self

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> int:
    """Print the one-line ``error: ...`` and return the usage exit status (``return fail(...)``)."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr, drawn only when stderr is a terminal and erased when done."""
    from tqdm import tqdm  # imported on first use: parsing a command line does not need it

    return tqdm(iterable, **{"disable": None, "leave": False, "dynamic_ncols": True, **kwargs})
