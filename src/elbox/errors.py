"""User-facing errors: one line that names the file, key or value and says what would be right.

Raise ``UserError`` for a user's mistake (a bad flag value, a missing file, a corrupt checkpoint); the CLI prints
its message as ``elbox: error: ...`` and exits with status 2, without a traceback. Programming errors stay
ordinary exceptions and keep their tracebacks.
"""


class UserError(Exception):
    """A mistake in what the user asked for or gave us; the message is shown as is, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def a_model(kind: str) -> str:
    """A model's kind with its article, as a sentence says it: "a DDPM", "a VAE", "an LDM"."""
    return {"ddpm": "a DDPM", "vae": "a VAE", "ldm": "an LDM"}.get(kind, f"a {kind}")


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


class EmptySplit(UserError):
    """A data set's split holds no example (a folder of one image has no test split)."""
