"""The error of the evaluation stage that means "bad input, not a bug": a checkpoint, setting or folder that
cannot be evaluated. Shared by the evaluator and the watcher, which must not import each other."""

from pipeline.cli import InputError


class EvaluationError(RuntimeError, InputError):
    """A checkpoint or setting that cannot be evaluated; the message says what to do."""
