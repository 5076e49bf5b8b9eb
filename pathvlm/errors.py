"""The errors a bad input raises, and each script's one error boundary.

Every layer raises InputError (a model folder without weights, a checkpoint from another run, a judge without its
key) with a message that names the key, the file and what to do. Where a library reads a file for us (torch.load,
safetensors, PEFT, json), `reading` turns its error into one of ours that names the file. `run_script` is the
boundary every script's __main__ goes through: what is left of a bad file or a failed write reaches the user as
one `error:` line and exit code 1, never a traceback; a bug keeps its traceback.
"""

import contextlib
import errno
import json
import os
import stat
import sys


class InputError(Exception):
    """A file, directory, model or variable the config names is missing or unusable. Its message names
    the key and the path; the scripts print it alone (a traceback would only bury it)."""


class MissingInput(InputError, FileNotFoundError):
    pass


class BadInput(InputError, ValueError):
    pass


def path_problem(path: str, want: str = "file") -> str | None:
    """What is wrong with `path` as a `want` (file | directory) to read, in words that finish "<path> ...", or
    None. Checked before anything opens it: opening a FIFO for reading waits for a writer that never comes."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno == errno.ENOTDIR:
            return "does not exist: a part of the path before its last is a file, not a folder"
        if e.errno == errno.EACCES:
            return "cannot be reached: a folder on the way is not readable by this user"
        return "does not exist" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
    if want == "directory" and not stat.S_ISDIR(st.st_mode):
        return "is a file, not a directory"
    if want == "file" and stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if want == "file" and not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        return f"is {kind}, not a regular file"
    if not os.access(path, os.R_OK | (os.X_OK if want == "directory" else 0)):
        return "is not readable by this user"
    return None


def _file_errors() -> tuple:
    """What the libraries raise on a file that is damaged or of another kind."""
    import pickle
    import zipfile

    import yaml
    from safetensors import SafetensorError

    return (OSError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError, RuntimeError,
            KeyError, yaml.YAMLError)


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


@contextlib.contextmanager
def reading(path: str, what: str, fix: str):
    """Any error while the enclosed code reads `path` -> BadInput: what, which file, what went wrong, what to do.
    RuntimeError is in the list for torch's `PytorchStreamReader failed` and PEFT's `size mismatch`."""
    try:
        yield
    except InputError:
        raise
    except _file_errors() as e:
        if "OutOfMemory" in type(e).__name__:  # torch.cuda.OutOfMemoryError is a RuntimeError: not the file's fault
            raise
        raise BadInput(f"{what} {path} cannot be read ({first_line(e)}): {fix}") from None


@contextlib.contextmanager
def writing(path: str):
    """An OSError while the enclosed code writes to the open file `path` names it: Python's own says only "File
    too large" or "No space left on device", without the file."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = path
        raise


# what to do about a failed read or write, by errno
REMEDY = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota",
          errno.EFBIG: "a file-size limit was reached (ulimit -f): raise it", errno.EROFS: "the file system is "
          "read-only: choose a writable place", errno.EACCES: "you lack the permission: choose a place you own, or "
          "fix its permissions", errno.EPERM: "the operation is not permitted there: choose another place",
          errno.ENOENT: "it does not exist: check the path", errno.EISDIR: "it is a directory, where a file is needed",
          errno.ENOTDIR: "a part of the path is a file, where a directory is needed",
          errno.ELOOP: "a symbolic link loop: fix the link", errno.EIO: "the disk reported an I/O error"}


def os_error_message(e: OSError) -> str:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
    remedy = REMEDY.get(e.errno, "check the path and the disk")
    return f"{where}: {e.strerror or first_line(e)} ({remedy})"


def run_script(main, interrupted: str | None = None):
    """A script's __main__: main() inside the one error boundary. InputError -> its message; an OSError (a disk
    full, a file-size limit, a folder not writable) -> the file and what to do; a damaged file that a library
    read without `reading` around it -> what the library said; each then exit 1. interrupted: the line printed on
    Ctrl-C or SIGTERM (a scheduler's stop), where the script saves as it goes and has nothing more to do on either;
    the training loops handle both themselves. Anything else is a bug and keeps its traceback."""
    import pickle
    import signal
    import zipfile

    from safetensors import SafetensorError

    if interrupted is not None:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C: KeyboardInterrupt
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {os_error_message(e)}")
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        sys.exit(interrupted)
    except (json.JSONDecodeError, SafetensorError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as e:
        sys.exit(f"error: a file the run reads is damaged or not what it should be ({first_line(e)}); the lines "
                 "above name the last one it opened")
