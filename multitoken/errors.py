"""The one exception type that means "the user gave bad input"."""


class UserError(ValueError):
    """Bad input from the user: the CLI prints its message on one line and exits with status 2."""


def check_at_least(config: object, minimum: int, *names: str) -> None:
    """UserError `NAME must be at least MINIMUM, got VALUE` for the first of the attributes `names` of
    `config` whose value is below `minimum` (a None value is left unset, not checked)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise UserError(f"{name} must be at least {minimum}, got {value}")
