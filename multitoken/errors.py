"""The one exception type that means "the user gave bad input"."""


class UserError(ValueError):
    """Bad input from the user: the CLI prints its message on one line and exits with status 2."""
