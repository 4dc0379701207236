"""The exception every layer below the public API raises when the exact engine cannot run."""


class Unsupported(Exception):
    """The exact engine has no rule for this model or loss; the message names what."""
