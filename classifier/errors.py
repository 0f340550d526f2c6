"""The classifier's error types: one for input it cannot use, one for a slice it skips."""

from __future__ import annotations


class ClassifierError(Exception):
    """Base of every error the classifier raises on purpose."""


class UnusableInputError(ClassifierError, ValueError):
    """A file or dataset the classifier cannot turn into a model input; ``str()`` says why."""


class SliceSkipped(UnusableInputError):
    """A readable slice that is not worth analysing (too little lung, say)."""


class ModelError(ClassifierError):
    """The model file or its card is missing or unreadable."""
