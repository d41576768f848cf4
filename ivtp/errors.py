"""The error every user-input problem raises: the CLI prints it as one line and exits with code 2."""


class InputError(ValueError):
    """A bad input (config, data, image, prompt, model name) found before any compute; the message says what to
    change. A ValueError, so callers that catch ValueError keep working."""
