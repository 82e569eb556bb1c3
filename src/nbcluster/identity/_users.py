"""The users file: the embedded identity source (``nbcluster user add NAME``).

A JSON file, owner-readable only, that the gateway reads on every change (``nbcluster user
add`` on a running cluster takes effect at the next request). It holds token digests, never
tokens: the token is printed once when a user is added or their token is replaced."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from ._tokens import USER_TOKEN_PREFIX, new_token, token_digest, tokens_equal

__all__ = ["Quotas", "UserRecord", "UsersFile", "UsersFileError", "validate_user_name"]

#: JupyterHub's names are close to this (it also allows more of Unicode, which we do not:
#: names end up in store keys and log lines).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def validate_user_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid user name {name!r}: 1-128 characters, letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    return name


class Quotas(BaseModel):
    """What one user may hold at once; None: no limit."""

    kernels: int | None = Field(default=None, ge=0, description="kernels running at once")
    gpus: int | None = Field(
        default=None, ge=0, description="GPUs committed at once (cells and jobs)"
    )


class UserRecord(BaseModel):
    name: str
    admin: bool = False
    token_sha256: str
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    quotas: Quotas = Field(default_factory=Quotas)


class _Document(BaseModel):
    users: dict[str, UserRecord] = Field(default_factory=dict)


class UsersFileError(Exception):
    """The users file cannot be read or changed; the message names the file and why."""


class UsersFile:
    """The users of one gateway. ``nbcluster user`` changes it; the gateway's authenticator
    reads it (:meth:`find`), reloading when the file changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._document = _Document()
        self._by_digest: dict[str, UserRecord] = {}

    # -- reading ------------------------------------------------------------------------------

    def _load(self) -> _Document:
        """Re-read the file if it changed since the last read (by mtime and size)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._document, self._by_digest = None, _Document(), {}
            return self._document
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return self._document
        if stat.st_mode & 0o077:
            raise UsersFileError(
                f"{self.path} is readable by others (mode {stat.st_mode & 0o777:o}); "
                f"run: chmod 600 {self.path}"
            )
        try:
            document = _Document.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise UsersFileError(f"cannot read the users file {self.path}: {exc}") from None
        self._stamp, self._document = stamp, document
        self._by_digest = {u.token_sha256: u for u in document.users.values()}
        return document

    def users(self) -> list[UserRecord]:
        with self._lock:
            return sorted(self._load().users.values(), key=lambda u: u.name)

    def get(self, name: str) -> UserRecord | None:
        with self._lock:
            return self._load().users.get(name)

    def find(self, token: str) -> UserRecord | None:
        """The user whose token this is (None: nobody's). Only user tokens are looked up."""
        if not token.startswith(USER_TOKEN_PREFIX):
            return None
        digest = token_digest(token)
        with self._lock:
            self._load()
            found = self._by_digest.get(digest)
        # The dict lookup is by digest, so timing reveals nothing about the token; compare
        # again in constant time all the same.
        return found if found is not None and tokens_equal(found.token_sha256, digest) else None

    # -- changing -----------------------------------------------------------------------------

    def add(self, name: str, admin: bool = False, quotas: Quotas | None = None) -> str:
        """Add a user; returns their token (shown once, never stored)."""
        validate_user_name(name)
        token = new_token(USER_TOKEN_PREFIX)
        with self._lock:
            document = self._load().model_copy(deep=True)
            if name in document.users:
                raise UsersFileError(f"user {name!r} exists already (nbcluster user token {name})")
            document.users[name] = UserRecord(
                name=name, admin=admin, token_sha256=token_digest(token), quotas=quotas or Quotas()
            )
            self._write(document)
        return token

    def replace_token(self, name: str) -> str:
        """A new token for ``name``; the old one stops working at once."""
        token = new_token(USER_TOKEN_PREFIX)
        with self._lock:
            document = self._load().model_copy(deep=True)
            user = document.users.get(name)
            if user is None:
                raise UsersFileError(f"no user named {name!r} in {self.path}")
            document.users[name] = user.model_copy(update={"token_sha256": token_digest(token)})
            self._write(document)
        return token

    def update(
        self, name: str, admin: bool | None = None, quotas: Quotas | None = None
    ) -> UserRecord:
        with self._lock:
            document = self._load().model_copy(deep=True)
            user = document.users.get(name)
            if user is None:
                raise UsersFileError(f"no user named {name!r} in {self.path}")
            changes: dict[str, object] = {}
            if admin is not None:
                changes["admin"] = admin
            if quotas is not None:
                changes["quotas"] = quotas
            document.users[name] = user = user.model_copy(update=changes)
            self._write(document)
        return user

    def remove(self, name: str) -> None:
        with self._lock:
            document = self._load().model_copy(deep=True)
            if document.users.pop(name, None) is None:
                raise UsersFileError(f"no user named {name!r} in {self.path}")
            self._write(document)

    def _write(self, document: _Document) -> None:
        """Atomically, owner-readable only from the first byte."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp creates it 0600
                f.write(document.model_dump_json(indent=2).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._stamp = None  # re-read (and index) on the next access
