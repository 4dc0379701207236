"""The engine's one exception."""


class Unsupported(Exception):
    """The exact engine has no rule for this model or loss; the message names what."""
