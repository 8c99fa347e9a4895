"""Reading JSON record files and writing JSON atomically — one implementation for the whole project.

Record files are either a JSON list (`.json`) or one JSON value a line (`.jsonl`). Errors name the
file and, for JSONL, the line. Writes go to a temporary file beside the target, are fsynced and then
renamed over it, so a crash leaves the old file or the new one, never half of one; a directory built
beside its target is published by `replace_directory` the same way. `is_within` is the check the writers use
to refuse an output that is, or lies inside, one of their inputs; `exclusive_lock` keeps a second process from
writing the same output at once. Logs grow by `append_durably`. A full or read-only disk is said as such, naming
the file being written (`disk_errors_named`), and the entry points print it without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator


# What json.loads raises for text it cannot turn into a value: its own JSONDecodeError, a ValueError for an integer
# of over 4300 digits (Python's limit on int parsing) and a RecursionError for deep nesting.
JSON_PARSE_ERRORS = (ValueError, RecursionError)


def json_parse_failure(err: BaseException) -> str:
    """What went wrong in a `JSON_PARSE_ERRORS` error, in a few words, for a message naming the file and line."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    if isinstance(err, RecursionError):
        return "nested too deeply to parse"
    return str(err).split(";")[0]  # "Exceeds the limit (4300 digits) for integer string conversion: ..."


def is_jsonl(path: str) -> bool:
    """Whether `path` names a JSON Lines file (by its suffix, in any case)."""
    return os.fspath(path).lower().endswith(".jsonl")


def read_json_records(path: str, error: type[Exception] = ValueError, lines: list[int] | None = None) -> list[Any]:
    """All records of a `.jsonl` file or of a `.json` file holding a list.

    A byte-order mark (Windows editors) is skipped at the start of the file, and of a `.jsonl` line (files joined
    with `cat`).

    Args:
        lines: for a `.jsonl` file, receives the line number of each record (blank lines hold none).

    Raises:
        error: the file is missing or unreadable, holds bytes that are not UTF-8, a line or the file is not
            JSON, or the JSON is not a list; naming the file and the line.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            if is_jsonl(path):
                records = []
                for line_number, raw in enumerate(handle, start=1):
                    text = _decoded(raw, f"{path} line {line_number}", error).removeprefix("\ufeff")
                    if text.strip():
                        try:
                            records.append(json.loads(text))
                        except JSON_PARSE_ERRORS as err:
                            raise error(f"{path} line {line_number} is not JSON: {json_parse_failure(err)}") from None
                        if lines is not None:
                            lines.append(line_number)
                return records
            data = handle.read()
    except OSError as err:
        raise error(f"cannot read {path}: {err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{path} line {line}: byte {data[err.start]:#04x} is not UTF-8 (file offset {err.start})") from None
    del data  # not held beside the text and the records while a large file is parsed
    try:
        value = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as err:
        raise error(f"{path} is not a JSON file (nor .jsonl): line {err.lineno}: {err.msg}") from None
    except JSON_PARSE_ERRORS as err:
        raise error(f"{path} cannot be read as JSON: {json_parse_failure(err)}") from None
    if not isinstance(value, list):
        raise error(f"{path} must hold a JSON list of records, found {type(value).__name__}")
    return value


def _decoded(raw: bytes, where: str, error: type[Exception]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: byte {raw[err.start]:#04x} at column {err.start + 1} is not UTF-8") from None


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


# The errors of a write that more room or another folder would let through: said as such, naming the file.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class DiskError(OSError):
    """A write that a full or read-only disk (or a file-size limit) stopped, naming the file (`write_error`)."""


def write_error(err: BaseException, path: str) -> DiskError | None:
    """`err`, raised while writing `path`, as a DiskError that names `path` and, for a full disk, its free space;
    None when it is no disk's error. safetensors reports the OS error in its text only ("... (os error 28)"),
    which gives the errno here."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found[1]) if found else None
    if code not in DISK_ERRNOS:
        return None
    text = (err.strerror if isinstance(err, OSError) else None) or str(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        text += f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free there)"
    return DiskError(code, text, path)


@contextmanager
def disk_errors_named(path: str) -> Iterator[None]:
    """A full or read-only disk's error raised in the block (an OSError, or safetensors' own) comes out as an
    OSError naming `path` (`write_error`); other errors pass as they are."""
    try:
        yield
    except DiskError:
        raise  # named already, by a write inside the block
    except Exception as err:
        named = write_error(err, path)
        if named is not None:
            raise named from err
        raise


@contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """A handle on a temporary file beside `path`; on a clean exit it is fsynced and renamed over `path`,
    on an error it is removed and `path` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with disk_errors_named(path):  # (the OS names the temporary file, or nothing)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users' jobs
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_durably(path: str, data: bytes) -> None:
    """Append `data` in one write, flushed and fsynced (a log's entry is on disk before the next is made). A write
    cut by a crash or a full disk leaves a last line without its newline, which the logs' readers drop."""
    with disk_errors_named(path), open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def atomic_write_texts(texts: dict[str, str]) -> None:
    """Write several files as one: all of them reach the disk before any is renamed into place, so a full disk
    leaves every one as it was (a report and its table told of two runs when the second write failed)."""
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            handle = stack.enter_context(atomic_open(path))
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # (the renames, on leaving, need no room)


def atomic_write_json(path: str, value: Any) -> None:
    """Write `value` as indented JSON (a list of records as JSON lines when `path` ends in .jsonl)."""
    if is_jsonl(path):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in value)
    else:
        text = json.dumps(value, ensure_ascii=False, indent=2) + "\n"
    atomic_write_text(path, text)


def replace_directory(new: str, target: str) -> None:
    """Put the finished directory `new` at `target`. A previous `target` is renamed aside first and deleted only
    once `new` is in place, so a crash leaves the old directory (under `target` or `<target>.replaced`) or the
    new one, never a mixture. A link at `target` is followed: the directory it points to is replaced (`new` must
    be on that directory's file system)."""
    target = os.path.realpath(target)
    if not os.path.exists(target):
        os.replace(new, target)
        fsync_directory(os.path.dirname(target))
        return
    old = target + ".replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    fsync_directory(os.path.dirname(target))  # the new one is in place on disk before the old one goes
    shutil.rmtree(old, ignore_errors=True)


def fsync_directory(directory: str) -> None:
    """Flush `directory`'s own entries (a rename into it, a file made or removed) to disk. A file system that takes
    no fsync of a directory (EINVAL, ENOTSUP) is let be: it orders its renames itself, or not at all."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def finish_tree(directory: str) -> None:
    """Ready a folder to be published by a rename: every file and folder is flushed to disk (a power cut after
    the rename must not leave the folder under its final name with some files empty), and the *.safetensors
    files this process wrote get the permissions the umask gives (safetensors, and so save_pretrained, writes
    them 0600, which other users' jobs on a shared cluster cannot read). Links and other files keep their
    modes: a merge carries the target's other files over as they are."""
    umask, me = _umask(), os.geteuid()
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                own = os.lstat(path)
                if (name.endswith(".safetensors") and stat.S_ISREG(own.st_mode) and own.st_uid == me
                        and own.st_mode & 0o777 == 0o600):
                    os.fchmod(handle.fileno(), 0o666 & ~umask)
                os.fsync(handle.fileno())
        fsync_directory(folder)


def is_within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies inside it, links resolved."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


@contextmanager
def exclusive_lock(lock_path: str, refusal: Callable[[str], Exception], remove: bool = False) -> Iterator[None]:
    """Hold `lock_path` (created if needed) for the block, or raise `refusal(holder)` at once if another process
    holds it; `holder` is "pid P on HOST" as the holder wrote it. The lock is the kernel's (flock): a process that
    dies releases it. With `remove`, the file is deleted when the block ends (a lock beside a user's folder)."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise refusal(handle.read().strip() or "another process") from None
        try:
            if remove and (not os.path.exists(lock_path) or not os.path.samestat(os.stat(lock_path),
                                                                                 os.fstat(handle.fileno()))):
                # Its holder deleted it between this open and this lock: another process may hold a new one.
                raise refusal("a process that has just ended")
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            if remove:
                with contextlib.suppress(OSError):
                    os.remove(lock_path)  # (still held: a process that opens it now makes a new file)
            fcntl.flock(handle, fcntl.LOCK_UN)
