"""Where a deployment's credentials come from, and where they go (never a command line).

The cluster secret (``pdserve.proto.auth``: it signs every internal gRPC call):

* ``pdserve up`` takes ``--cluster-secret-file``, else ``$PDSERVE_CLUSTER_SECRET`` /
  ``$PDSERVE_CLUSTER_SECRET_FILE``, else generates one (:func:`cluster_secret_for_up`).
  It gives the secret to its store server and gateway in-process and to every worker
  as a Ray actor argument, and leaves a generated one in ``$PDSERVE_HOME/cluster-secret``
  (mode 0600) for ``pdserve scale`` and other tools on the machine, removed on exit
  (:class:`LocalSecret`).
* Clients on the machine sign with :func:`client_secret`: their own, else the
  environment's, else that file.

The control-plane Redis password (``deploy/store/redis_store.py`` reads it): a URL's
own, else ``$PDSERVE_REDIS_PASSWORD`` / ``$PDSERVE_REDIS_PASSWORD_FILE``. A URL that
carries one on a command line gets a warning (:func:`warn_if_password_in_url`); the Ray
launcher strips it from the workers' flags and hands it over as an actor argument.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from pdserve.proto import auth

from .state import home_dir

log = logging.getLogger("pdserve.credentials")

LOCAL_SECRET_NAME = "cluster-secret"
REDIS_PASSWORD_ENV = "PDSERVE_REDIS_PASSWORD"
REDIS_PASSWORD_FILE_ENV = "PDSERVE_REDIS_PASSWORD_FILE"


def local_secret_file() -> Path:
    """``$PDSERVE_HOME/cluster-secret``: the secret of the local ``pdserve up``, if it runs."""
    return home_dir() / LOCAL_SECRET_NAME


def client_secret(explicit: bytes | None = None) -> bytes | None:
    """What a client signs with: ``explicit``, else the environment's
    (:func:`pdserve.proto.auth.load_secret`), else :func:`local_secret_file`'s, else None.

    Only clients fall back to the file: a server that checks no token ignores one, so a
    stale file never locks a client out, while a server must be told its secret.
    """
    if explicit is not None:
        return explicit
    found = auth.load_secret()
    if found is not None:
        return found
    path = local_secret_file()
    if path.is_file():
        try:
            return auth.read_secret_file(path)
        except ValueError as e:
            log.warning("ignoring %s: %s", path, e)
    return None


def cluster_secret_for_up(secret_file: str | None) -> tuple[bytes, bool]:
    """(secret, whether it was generated here) for ``pdserve up``."""
    if secret_file:
        return auth.read_secret_file(secret_file), False
    given = auth.load_secret()
    if given is not None:
        return given, False
    return auth.generate_secret(), True


class LocalSecret:
    """``pdserve up``'s generated secret in :func:`local_secret_file` while it runs."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.path = auth.write_secret_file(local_secret_file(), secret)

    def remove(self) -> None:
        """Delete the file unless another ``pdserve up`` has replaced it since."""
        try:
            if auth.read_secret_file(self.path) == self.secret:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def url_password(url: str) -> str | None:
    """The password embedded in a store URL (``redis://:PASSWORD@host``), if any."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return None if password is None else unquote(password)


def strip_password(url: str) -> str:
    """``url`` without its user-info password (kept: the user name)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and logs)."""
    if url_password(url) is None:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    return strip_password(url).replace("://" + (f"{user}@" if user else ""), f"://{user}:***@", 1)


def redis_password(url: str, explicit: str | None = None) -> str | None:
    """The password for the Redis at ``url``: ``explicit``, else the URL's own (None here:
    redis-py takes it from the URL), else ``$PDSERVE_REDIS_PASSWORD``, else the contents
    of ``$PDSERVE_REDIS_PASSWORD_FILE`` (mode 600), else None."""
    if explicit:
        return explicit
    if url_password(url):
        return None
    value = os.environ.get(REDIS_PASSWORD_ENV, "")
    if value:
        return value
    path = os.environ.get(REDIS_PASSWORD_FILE_ENV, "").strip()
    if path:
        return auth.read_secret_file(path, "Redis password").decode()
    return None


def warn_if_password_in_url(url: str | None, flag: str) -> None:
    if url and url_password(url):
        log.warning("%s carries a password, which other users of this machine can read on the command line; "
                    "put it in $PDSERVE_REDIS_PASSWORD_FILE (mode 600) or $PDSERVE_REDIS_PASSWORD instead", flag)


__all__ = ["LocalSecret", "client_secret", "cluster_secret_for_up", "local_secret_file", "redact", "redis_password",
           "strip_password", "url_password", "warn_if_password_in_url"]
