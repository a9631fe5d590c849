"""The one exception type a user sees: its message is a single line saying what, where and how to fix."""


class PipelineError(Exception):
    """A problem with the user's input or files, reported as one line and a non-zero exit."""
