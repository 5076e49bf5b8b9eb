"""The errors a bad input raises. Every layer raises them (a model folder without weights, a checkpoint from
another run, a judge without its key); the scripts catch InputError and print its message alone: it names the
key and the path, and a traceback would only bury it."""


class InputError(Exception):
    """A file, directory, model or variable the config names is missing or unusable. Its message names
    the key and the path; the scripts print it alone (a traceback would only bury it)."""


class MissingInput(InputError, FileNotFoundError):
    pass


class BadInput(InputError, ValueError):
    pass
