"""The error every user-input problem raises: the CLI prints it as one line and exits with code 2."""

import sys


class InputError(ValueError):
    """A bad input (config, data, image, prompt, model name) found before any compute; the message says what to
    change. A ValueError, so callers that catch ValueError keep working."""


def run_reporting_input_errors(call) -> int:
    """call()'s exit code (None: 0); a bad input (an InputError, or a file not found) is instead one line on
    stderr and exit code 2, the entry points' way (`ivtp`, train/*.py), rather than a traceback."""
    try:
        return call() or 0
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
