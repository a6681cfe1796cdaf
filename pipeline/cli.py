"""The frame every command runs in: its ``--help``, its exit codes and its one-line errors.

    def main(argv=None) -> int:
        p = cli.parser("python -m evaluation.export", __doc__)
        p.add_argument(...)
        a = p.parse_args(argv)
        return cli.run("export", lambda: export(a))

Exit codes, the same for every command (launch/train.py, prepare, evaluate, export, compare, pyfunc_model, the
demo, train_digits_net); this table is the one place they are defined (docs and --help texts refer to it):

    0   done
    1   a failure that is not the input's: a bug, the machine (CUDA out of memory, NCCL): the traceback is printed
    2   an input to fix (a config, data, a checkpoint, a setting; ``InputError``): one line, ``NAME: error: ...``
    3   done in part: prepare skipped unreadable inputs; evaluate --watch gave up waiting
    75  preempted after writing a checkpoint (EX_TEMPFAIL): requeue and it resumes

argparse's own usage errors exit 2 as well.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2
EXIT_PARTIAL = 3
EXIT_PREEMPTED = 75


class InputError(Exception):
    """Base of every error that means "fix the input": the message says what was wrong and how to fix it.

    Each layer's input errors subclass it beside their own base (so ``except ValueError`` still catches them):
    ConfigError, DataError (ManifestError, CorruptDataError, RemoteError), SourceError, PrepareError,
    InteropError, CheckpointError, EvaluationError, ReferenceStatsError, InceptionWeightsUnavailable. Not the
    non-finite stops (NonFiniteLossError, NonFiniteWeightsError): those are failures, exit 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default where one is worth showing (not None, False or empty), and the
    description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (str, list)) and not d):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # argparse's wrapping also breaks at hyphens, which cut paths such as a default store in a folder
        # named with a hyphen ("ci-" / "check/..."); wrap at whitespace only
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def parser(prog: str, doc: str | None, *, full_description: bool = False) -> argparse.ArgumentParser:
    """An argument parser whose description is the first line of ``doc`` and whose epilog is the rest (or, with
    ``full_description``, all of ``doc`` as the description)."""
    doc = doc or ""
    if full_description:
        return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0], epilog=doc, formatter_class=HelpFormatter)


def error_line(name: str, exc: BaseException) -> str:
    """``NAME: error: MESSAGE``."""
    return f"{name}: error: {exc}"


def run(name: str, body: Callable[[], int], *, on_input_error: Callable[[InputError], str] | None = None) -> int:
    """``body()``'s exit code; an ``InputError`` prints one line on stderr and gives 2, any other exception its
    traceback and 1 (``SystemExit`` passes through). ``on_input_error(exc)``: runs first and returns the line to
    print instead of ``NAME: error: ...`` (training's ``[rank R] error: ...``, after it starts ignoring SIGTERM;
    it tears its process groups down when ``run`` has returned 2, once the line is out)."""
    try:
        return body()
    except InputError as exc:
        line = on_input_error(exc) if on_input_error is not None else error_line(name, exc)
        print(line, file=sys.stderr, flush=True)
        return EXIT_INPUT
    except Exception:
        # not the input: a bug or the machine (CUDA out of memory, NCCL); whoever debugs it needs the traceback
        traceback.print_exc()
        return EXIT_FAILURE
