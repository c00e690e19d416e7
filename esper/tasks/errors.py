"""The one error type for bad task data: a user error (exit code 2), never a bug."""


class DataError(ValueError):
    """Missing, malformed or too-small task data, or an unknown task.

    The CLI prints ``esper: error: <message>``, so the message is kept to one line
    even when it quotes text from a foreign exception.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))
