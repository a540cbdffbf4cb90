"""Job history: where ended jobs and their traces are kept for reading."""

from trunkline.store.memory import JobHistory

__all__ = ["JobHistory"]
