"""Checks of user input that would otherwise fail far from its cause, each naming the field and the fix."""

from pathlib import Path


def looks_like_local_path(name_or_path: str) -> bool:
    """True for what cannot be a Hub id: an absolute path, one starting with `.` or `~`, or one with more than one
    `/` (Hub ids are `name` or `owner/name`)."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def check_local_path(name_or_path, field: str) -> None:
    """Refuse a local path that does not exist, before a loader reports it as a malformed Hub id."""
    if isinstance(name_or_path, str | Path) and looks_like_local_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            hint = " (the tiny models are written by `hf-reinforce make-tiny`)" if "tiny" in str(path) else ""
            raise FileNotFoundError(
                f"{field}={str(name_or_path)!r}: no such file or folder{hint}. Check the path, or give a Hub id "
                "(`owner/name`)."
            )
