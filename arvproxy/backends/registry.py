"""
The embedded registry: the default cluster backend, one SQLite file on one machine.

The controller, every node gateway and the C{arvproxy} admin command open the same file at
once, from several processes.  That is safe because the database runs in WAL mode (readers never
block the writer), every connection waits up to C{busy_timeout} seconds for a lock instead of
failing, and every write is one short C{BEGIN IMMEDIATE} transaction (it takes the write lock
up front, so two writers never deadlock upgrading a read lock).

Two layers:

  - L{RegistryStore} is synchronous and blocking: plain methods that return records or raise.
    The CLI uses it directly; tests use it for setup.
  - L{arvproxy.backends.embedded.EmbeddedRegistry} provides L{ICluster} for the reactor: it
    runs every store call in its own thread pool and returns Deferreds, so no database work
    ever blocks the reactor.

Records have Arvados shapes and UUIDs (C{<cluster>-<infix>-<15 [a-z0-9]>}).  Times are stored as
UTC ISO 8601 strings.  Tokens are Arvados v2 tokens, C{v2/<token uuid>/<secret>}; only the
SHA-256 of the secret is stored, so a copy of the file does not leak working tokens.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import stat
import string
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arvproxy.backends import (
    CAN_MANAGE,
    CANCELLED,
    COMPLETE,
    CONTAINER_INFIX,
    CONTAINER_REQUEST_INFIX,
    FINAL_STATES,
    LEVELS,
    LINK_INFIX,
    LOCKED,
    QUEUED,
    RUNNING,
    TOKEN_INFIX,
    UPDATABLE_CONTAINER_FIELDS,
    USER_INFIX,
    UUID_RE,
    Container,
    ContainerRequest,
    Credentials,
    User,
    uuid_infix,
)
from arvproxy.errors import NotFound, Unauthorized

SCHEMA_VERSION = 2
"""C{PRAGMA user_version} of a database this module created and understands (version 1, from
before containers had C{interactive_session_started} and requests C{properties}, is upgraded
when opened)."""

STATES = (QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED)
"""Every container state."""

ACCESS_LEVELS = ("private", "public")
"""The values of C{published_ports[port]["access"]}."""


_ALNUM = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 50
_MAX_TOKEN_LENGTH = 512
_SECRET_RE = re.compile(r"[A-Za-z0-9]+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    uuid TEXT PRIMARY KEY,
    full_name TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    is_active INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_client_authorizations (
    uuid TEXT PRIMARY KEY,
    owner_uuid TEXT NOT NULL REFERENCES users (uuid) ON DELETE CASCADE,
    secret_sha256 TEXT NOT NULL,
    scopes TEXT NOT NULL,
    expires_at TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    uuid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    gateway_address TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    started_at TEXT,
    finished_at TEXT,
    container_image TEXT NOT NULL,
    command TEXT NOT NULL,
    environment TEXT NOT NULL,
    cwd TEXT NOT NULL,
    published_ports TEXT NOT NULL,
    listening_ports TEXT NOT NULL DEFAULT '[]',
    runtime_status TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL,
    interactive_session_started INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS containers_state ON containers (state);
CREATE TABLE IF NOT EXISTS container_requests (
    uuid TEXT PRIMARY KEY,
    owner_uuid TEXT NOT NULL REFERENCES users (uuid),
    modified_by_user_uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    container_uuid TEXT REFERENCES containers (uuid),
    container_image TEXT NOT NULL,
    command TEXT NOT NULL,
    environment TEXT NOT NULL,
    cwd TEXT NOT NULL,
    published_ports TEXT NOT NULL,
    created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL,
    properties TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS container_requests_container
    ON container_requests (container_uuid);
CREATE TABLE IF NOT EXISTS links (
    uuid TEXT PRIMARY KEY,
    owner_uuid TEXT NOT NULL,
    link_class TEXT NOT NULL,
    name TEXT NOT NULL,
    tail_uuid TEXT NOT NULL,
    head_uuid TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS links_tail_head ON links (tail_uuid, head_uuid);
"""


_UPGRADE_FROM_1 = (
    "ALTER TABLE containers ADD COLUMN interactive_session_started INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE container_requests ADD COLUMN properties TEXT NOT NULL DEFAULT '{}'",
)
"""What turns a version 1 registry into this version."""


class RegistryError(Exception):
    """The registry file cannot be used (written by a newer arvproxy, or not a registry)."""


_OPEN_ATTEMPTS = 5
"""How many times L{RegistryStore} tries to open a file that is replaced as it opens it."""


def file_identity(path: str) -> tuple[int, int] | None:
    """
    The device and inode of the file at C{path}, or C{None} when nothing is there.  It tells a
    process whether the path still names the file its connections opened.  C{stat} opens no
    descriptor, so it never disturbs the process's POSIX locks on the file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _create_private_file(path: str) -> None:
    """
    Create an empty file at C{path}, readable and writable by its owner only, unless something
    is there already; SQLite gives the -wal and -shm files the database file's mode.

    C{mknod} makes the file without opening it: no descriptor is ever closed on a file that
    SQLite may hold locks on (see L{RegistryStore._connect}).
    """
    try:
        os.mknod(path, stat.S_IFREG | 0o600)
    except FileExistsError:
        pass
    except PermissionError:
        # Some sandboxes refuse mknod even for a plain file: make it under another name, close
        # it while nobody else can know of it, then link it in unless something is there now.
        temporary = f"{path}.new-{os.getpid()}-{secrets.token_hex(4)}"
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)


@dataclass(frozen=True)
class Token:
    """
    An API client authorization, without its secret (which is never stored).

    @ivar owner_uuid: the user the token acts as.
    @ivar expires_at: when the token stops working, or C{None} if it never does.
    """

    uuid: str
    owner_uuid: str
    scopes: tuple[str, ...] = ("all",)
    expires_at: datetime | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class Link:
    """
    An Arvados link.  A permission link has C{link_class} C{"permission"}, a level from
    L{LEVELS} as its C{name}, the user as C{tail_uuid} and the record as C{head_uuid}.
    """

    uuid: str
    link_class: str
    name: str
    tail_uuid: str
    head_uuid: str
    owner_uuid: str = ""
    created_at: datetime | None = None


_KINDS: dict[type, str] = {
    User: "arvados#user",
    Token: "arvados#apiClientAuthorization",
    ContainerRequest: "arvados#containerRequest",
    Container: "arvados#container",
    Link: "arvados#link",
}


def format_time(moment: datetime) -> str:
    """C{moment} as UTC ISO 8601 with microseconds and a C{Z}: C{2024-05-01T12:00:00.000000Z}."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """The aware UTC datetime written by L{format_time}."""
    return datetime.fromisoformat(text).astimezone(UTC)


def to_json(record: Any) -> dict[str, Any]:
    """
    An Arvados-style JSON-able dict for a record dataclass (L{User}, L{Token}, L{Link},
    L{ContainerRequest}, L{Container}, L{Credentials}): datetimes become ISO 8601 strings,
    tuples become lists, and known record types get their Arvados C{kind}.

    @raise TypeError: C{record} is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"not a record: {record!r}")
    out: dict[str, Any] = {}
    kind = _KINDS.get(type(record))
    if kind is not None:
        out["kind"] = kind
    for f in dataclasses.fields(record):
        out[f.name] = _jsonable(getattr(record, f.name))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a token secret: what the registry stores instead of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_v2_token(token: str) -> tuple[str, str]:
    """
    Split an Arvados v2 token C{v2/<token uuid>/<secret>}.

    @return: C{(token_uuid, secret)}.
    @raise Unauthorized: C{token} is not shaped like a v2 token.  The message never contains
        the token.
    """
    parts = token.split("/")
    if (
        len(token) > _MAX_TOKEN_LENGTH
        or len(parts) != 3
        or parts[0] != "v2"
        or not UUID_RE.match(parts[1])
        or parts[1][6:11] != TOKEN_INFIX
        or not _SECRET_RE.fullmatch(parts[2])
    ):
        raise Unauthorized(
            "The token is not a valid Arvados API token.",
            hint="Use a token of the form v2/<uuid>/<secret> from the arvproxy admin command.",
        )
    return parts[1], parts[2]


def system_user_uuid(cluster_id: str) -> str:
    """The system (root) user of a cluster, as which the SystemRootToken acts."""
    return f"{cluster_id}-{USER_INFIX}-000000000000000"


PORT_PROTOCOLS = ("http", "https")


def normalize_published_ports(ports: Mapping[Any, Any] | None) -> dict[str, dict[str, Any]]:
    """
    Check and complete C{published_ports} in the Arvados shape
    C{{"8888": {"access": "private", "label": "", "initial_path": ""}}}.  Keys may be ints or
    strings; missing entries default to a private port with no label or initial path.

    @raise ValueError: a port is not 1-65535, or an entry is malformed.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, entry in (ports or {}).items():
        try:
            port = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"published port {key!r} is not a port number") from None
        if isinstance(key, bool) or not 1 <= port <= 65535 or str(key) != str(port):
            raise ValueError(f"published port {key!r} is not a port number between 1 and 65535")
        entry = {} if entry is None else entry
        if not isinstance(entry, Mapping):
            raise ValueError(f"published port {port}: expected a mapping, got {entry!r}")
        access = entry.get("access", "private")
        if access not in ACCESS_LEVELS:
            raise ValueError(f"published port {port}: access must be private or public")
        label = entry.get("label", "")
        initial_path = entry.get("initial_path", "")
        if not isinstance(label, str) or not isinstance(initial_path, str):
            raise ValueError(f"published port {port}: label and initial_path must be strings")
        protocol = entry.get("protocol", "http")
        if protocol not in PORT_PROTOCOLS:
            raise ValueError(f"published port {port}: protocol must be http or https")
        out[str(port)] = {"access": access, "label": label, "initial_path": initial_path}
        if protocol != "http":
            # arvproxy's own addition to Arvados' shape: the service speaks TLS.
            out[str(port)]["protocol"] = protocol
    return out


class RegistryStore:
    """
    The registry's synchronous core: plain blocking methods over one SQLite file.

    Each thread that calls a method gets its own connection (kept in a C{threading.local}), so
    one store may be used from many threads; each process opens the file separately.  The
    schema is created the first time any thread connects, if the file does not have it yet.

    Failures: L{NotFound} for an unknown UUID, L{Unauthorized} from L{authenticate},
    C{ValueError} for malformed arguments, L{RegistryError} for a file this code cannot use,
    and C{sqlite3.Error} when the database itself fails (for instance, still locked after
    C{busy_timeout} seconds).

    @ivar path: the SQLite file.
    @ivar cluster_id: the five-character prefix of every UUID this store creates.
    """

    def __init__(
        self,
        path: str,
        cluster_id: str,
        clock: Callable[[], float] = time.time,
        *,
        system_root_token: str = "",
        busy_timeout: float = 10.0,
        read_only: bool = False,
    ) -> None:
        """
        @param clock: the current Unix time; decides token expiry and record timestamps.
        @param system_root_token: the cluster's SystemRootToken, accepted by L{authenticate}
            as the system user; C{""} disables it.
        @param busy_timeout: seconds to wait for another connection's lock before failing.
        @param read_only: only read: never create the file, its directory or its schema, and
            open it read-only (every change fails); a missing file is a L{RegistryError}.
        @raise ValueError: C{cluster_id} is not five characters a-z, 0-9.
        """
        if not re.fullmatch(r"[a-z0-9]{5}", cluster_id):
            raise ValueError(f"not an Arvados cluster id (5 characters a-z, 0-9): {cluster_id!r}")
        self.path = path
        self.cluster_id = cluster_id
        self._clock = clock
        self._root_token = system_root_token.encode("utf-8")
        self._busy_timeout = busy_timeout
        self.read_only = read_only
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        # The identity of the file whose schema was checked, or None.
        self._schema_ready: tuple[int, int] | None = None
        # Whether a connection was ever made: from then on a missing file is an error (it was
        # removed or renamed under this process), not a registry to create.
        self._opened_once = False

    # -- connections and transactions --------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and file_identity(self.path) != self._local.identity:
            # The path names another file now (replaced, or removed): this connection reads
            # a copy no other process will ever write again.  Closing it is safe: SQLite
            # neither checkpoints nor deletes the -wal and -shm of a file that has moved.
            self._local.conn = None
            conn.close()
            conn = None
        if conn is None:
            if self.read_only:
                conn = self._connect_read_only()
                self._local.identity = file_identity(self.path)
            else:
                conn, self._local.identity = self._connect()
            self._local.conn = conn
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that cannot write, to a registry file that must exist already."""
        if not os.path.isfile(self.path):
            raise RegistryError(
                f"{self.path}: there is no registry here (no such file); nothing has been "
                "registered yet, or the configuration names another file"
            )
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA query_only = ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if 0 < version < SCHEMA_VERSION:
                # Upgraded in place by the first process that may write (see _create_schema).
                raise RegistryError(
                    f"{self.path}: this registry is from an older arvproxy (schema version "
                    f"{version}); start the front door or the dispatcher once to upgrade it"
                )
            if version != SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path}: not an arvproxy registry this version understands "
                    f"(schema version {version}, expected {SCHEMA_VERSION})"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """
        A new connection, and the identity of the file it opened (see L{file_identity}).

        The file itself is only ever opened by SQLite: closing any descriptor of it outside
        SQLite would drop the process's POSIX locks on it (all of them, SQLite's too), and the
        next process to close its last connection would then delete the -wal and -shm files
        from under this one, leaving it on a copy nobody else sees (issue 16, hole 0).
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except FileExistsError:
            # Something that is not a directory is in the way: say so.
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None
        for _ in range(_OPEN_ATTEMPTS):
            before = file_identity(self.path)
            if before is None:
                if self._opened_once:
                    raise RegistryError(
                        f"{self.path}: the registry file was removed or renamed while in use"
                    )
                _create_private_file(self.path)
                continue
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                self._set_up(conn)
            except BaseException:
                conn.close()
                raise
            if file_identity(self.path) == before:
                self._opened_once = True
                return conn, before
            conn.close()  # Replaced while it was being opened: open what is there now.
        raise RegistryError(f"{self.path}: the registry file keeps being replaced")

    def _set_up(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RegistryError(f"{self.path}: cannot switch the database to WAL mode")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._schema_lock:
            # Checked once per file: a file put in the path's place gets its own check.
            identity = file_identity(self.path)
            if self._schema_ready != identity:
                self._create_schema(conn)
                self._schema_ready = identity

    def check(self) -> None:
        """
        Open the registry now (creating the file and its tables if there are none), so that a
        process can refuse to start on a registry it cannot use.

        @raise RegistryError: the file is not a registry this code can use.
        @raise sqlite3.Error: SQLite cannot open or read it.
        @raise OSError: its directory cannot be made, or the file cannot be created.
        """
        self._connection()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """Create the tables unless the file has them; safe to race with other processes."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1:
                for statement in _UPGRADE_FROM_1:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path}: registry schema version {version} is not the version this "
                    f"arvproxy understands ({SCHEMA_VERSION}); upgrade arvproxy"
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """
        One transaction: C{BEGIN IMMEDIATE} for a write (takes the write lock now, waiting up
        to the busy timeout), C{BEGIN} for a consistent read.  Rolls back on any exception.
        """
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """
        Close the calling thread's connection, if it has one.  Connections of other threads
        close when those threads end.  The store reconnects if used again.
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    # -- helpers -----------------------------------------------------------------------------

    def _new_uuid(self, infix: str) -> str:
        return f"{self.cluster_id}-{infix}-{''.join(secrets.choice(_ALNUM) for _ in range(15))}"

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _require_user(self, conn: sqlite3.Connection, user_uuid: str) -> None:
        if conn.execute("SELECT 1 FROM users WHERE uuid = ?", (user_uuid,)).fetchone() is None:
            raise NotFound(f"There is no user {user_uuid}.")

    # -- users -------------------------------------------------------------------------------

    def create_user(self, full_name: str, is_admin: bool = False, is_active: bool = True) -> User:
        """Add a user with a new C{tpzed} UUID."""
        uuid = self._new_uuid(USER_INFIX)
        now = format_time(self._now())
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO users (uuid, full_name, is_admin, is_active, created_at, modified_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (uuid, full_name, int(is_admin), int(is_active), now, now),
            )
        return User(uuid=uuid, full_name=full_name, is_admin=is_admin, is_active=is_active)

    def get_user(self, uuid: str) -> User:
        """@raise NotFound: no such user."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT uuid, full_name, is_admin, is_active FROM users WHERE uuid = ?", (uuid,)
            ).fetchone()
        if row is None:
            raise NotFound(f"There is no user {uuid}.")
        return User(uuid=row[0], full_name=row[1], is_admin=bool(row[2]), is_active=bool(row[3]))

    def set_user_active(self, uuid: str, is_active: bool) -> User:
        """Activate or deactivate a user; an inactive user's tokens stop working."""
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE users SET is_active = ?, modified_at = ? WHERE uuid = ?",
                (int(is_active), format_time(self._now()), uuid),
            )
            if cursor.rowcount != 1:
                raise NotFound(f"There is no user {uuid}.")
        return self.get_user(uuid)

    def list_users(self) -> list[User]:
        """Every user, oldest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT uuid, full_name, is_admin, is_active FROM users ORDER BY created_at, uuid"
            ).fetchall()
        return [
            User(uuid=r[0], full_name=r[1], is_admin=bool(r[2]), is_active=bool(r[3])) for r in rows
        ]

    # -- tokens ------------------------------------------------------------------------------

    def create_token(
        self, user_uuid: str, scopes: Iterable[str] = ("all",), ttl: float | None = None
    ) -> tuple[str, Token]:
        """
        Issue a new v2 token for C{user_uuid}.

        @param scopes: Arvados scopes (C{"all"}, or C{"GET /arvados/v1/..."} entries).
        @param ttl: seconds until the token expires, or C{None} for never.
        @return: C{(api_token, record)}.  C{api_token} is the only copy of the secret: the
            registry keeps just its hash.
        @raise NotFound: no such user.
        @raise ValueError: empty scopes, or a C{ttl} that is not positive.
        """
        scope_list = tuple(scopes)
        if not scope_list or not all(isinstance(s, str) and s.strip() for s in scope_list):
            raise ValueError("a token needs at least one non-empty scope")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"a token's ttl must be a positive number of seconds, not {ttl!r}")
        uuid = self._new_uuid(TOKEN_INFIX)
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
        now = self._now()
        expires_at = None if ttl is None else datetime.fromtimestamp(self._clock() + ttl, UTC)
        with self._transaction(write=True) as conn:
            self._require_user(conn, user_uuid)
            conn.execute(
                "INSERT INTO api_client_authorizations"
                " (uuid, owner_uuid, secret_sha256, scopes, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    uuid,
                    user_uuid,
                    hash_secret(secret),
                    json.dumps(list(scope_list)),
                    None if expires_at is None else format_time(expires_at),
                    format_time(now),
                ),
            )
        record = Token(
            uuid=uuid,
            owner_uuid=user_uuid,
            scopes=scope_list,
            expires_at=expires_at,
            created_at=now,
        )
        return f"v2/{uuid}/{secret}", record

    _TOKEN_COLUMNS = "uuid, owner_uuid, scopes, expires_at, created_at"

    @staticmethod
    def _token(row: tuple[Any, ...]) -> Token:
        return Token(
            uuid=row[0],
            owner_uuid=row[1],
            scopes=tuple(json.loads(row[2])),
            expires_at=None if row[3] is None else parse_time(row[3]),
            created_at=parse_time(row[4]),
        )

    def get_token(self, uuid: str) -> Token:
        """The token record (never its secret).  @raise NotFound: no such token."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                f"SELECT {self._TOKEN_COLUMNS} FROM api_client_authorizations WHERE uuid = ?",
                (uuid,),
            ).fetchone()
        if row is None:
            raise NotFound(f"There is no token {uuid}.")
        return self._token(row)

    def list_tokens(self, user_uuid: str | None = None) -> list[Token]:
        """Every token, or every token of C{user_uuid}, oldest first."""
        query = f"SELECT {self._TOKEN_COLUMNS} FROM api_client_authorizations"
        params: tuple[str, ...] = ()
        if user_uuid is not None:
            query, params = query + " WHERE owner_uuid = ?", (user_uuid,)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY created_at, uuid", params).fetchall()
        return [self._token(r) for r in rows]

    def revoke_token(self, token_or_uuid: str) -> Token:
        """
        Delete a token, given its UUID or the whole v2 token; it stops working at once.

        @return: the record of the revoked token.
        @raise NotFound: no such token.
        @raise ValueError: the argument is neither a token UUID nor a v2 token.
        """
        uuid = token_or_uuid
        if token_or_uuid.startswith("v2/"):
            try:
                uuid, _ = parse_v2_token(token_or_uuid)
            except Unauthorized:
                raise ValueError("not a v2 token (v2/<uuid>/<secret>) or a token UUID") from None
        elif not UUID_RE.match(uuid) or uuid_infix(uuid) != TOKEN_INFIX:
            raise ValueError("not a v2 token (v2/<uuid>/<secret>) or a token UUID")
        with self._transaction(write=True) as conn:
            row = conn.execute(
                f"SELECT {self._TOKEN_COLUMNS} FROM api_client_authorizations WHERE uuid = ?",
                (uuid,),
            ).fetchone()
            if row is None:
                raise NotFound(f"There is no token {uuid}.")
            conn.execute("DELETE FROM api_client_authorizations WHERE uuid = ?", (uuid,))
        return self._token(row)

    def exchange_token(self, token: str, ttl: float) -> str:
        """
        Use up a token and issue another with the same owner and scopes, valid for C{ttl}
        seconds: how a short-lived link (one minute or so, seen in a URL and so in the browser's
        history) becomes a session that lasts, while the link itself stops working at once.

        @return: the new token.
        @raise Unauthorized: C{token} is not valid (or was already used).
        """
        credentials = self.authenticate(token)
        if credentials.token_uuid is None:
            raise Unauthorized("The SystemRootToken cannot be exchanged.")
        new_token, _ = self.create_token(credentials.user_uuid, credentials.scopes, ttl)
        try:
            self.revoke_token(credentials.token_uuid)
        except NotFound:
            # Someone used it at the same moment: only one of the two exchanges may win.
            self.revoke_token(new_token)
            raise Unauthorized("This link has already been used.") from None
        return new_token

    def authenticate(self, token: str) -> Credentials:
        """
        Check an API token: a v2 token in this registry, or the SystemRootToken.

        @return: what the token proves.  For the SystemRootToken: the system user, an admin,
            with C{token_uuid} C{None} and scope C{"all"}.
        @raise Unauthorized: malformed, unknown, wrong secret, revoked, expired (by the
            injected clock), or the user is inactive.  Messages never contain the token.
        """
        if self._root_token and hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self._root_token
        ):
            return Credentials(
                token_uuid=None,
                user_uuid=system_user_uuid(self.cluster_id),
                is_admin=True,
                scopes=("all",),
            )
        uuid, secret = parse_v2_token(token)
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT t.secret_sha256, t.scopes, t.expires_at, u.uuid, u.is_admin, u.is_active"
                " FROM api_client_authorizations AS t JOIN users AS u ON u.uuid = t.owner_uuid"
                " WHERE t.uuid = ?",
                (uuid,),
            ).fetchone()
        # Compare even when there is no row, so an unknown UUID takes as long as a bad secret.
        stored = row[0] if row is not None else hash_secret("")
        matches = hmac.compare_digest(hash_secret(secret).encode(), stored.encode())
        if row is None or not matches:
            raise Unauthorized(
                "The token is not valid: it is unknown, wrong, or has been revoked.",
                hint="Get a new token from the cluster administrator.",
            )
        expires_at = None if row[2] is None else parse_time(row[2])
        if expires_at is not None and expires_at.timestamp() <= self._clock():
            raise Unauthorized("The token has expired.", hint="Get a new token.")
        if not row[5]:
            raise Unauthorized(
                "The account this token belongs to is not active.",
                hint="Ask the cluster administrator to activate it.",
            )
        return Credentials(
            token_uuid=uuid,
            user_uuid=row[3],
            is_admin=bool(row[4]),
            scopes=tuple(json.loads(row[1])),
            expires_at=expires_at,
        )

    # -- container requests and containers ---------------------------------------------------

    def create_container_request(
        self,
        owner_uuid: str,
        *,
        name: str = "",
        container_image: str = "",
        command: Iterable[str] = (),
        environment: Mapping[str, str] | None = None,
        cwd: str = "",
        published_ports: Mapping[Any, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> ContainerRequest:
        """
        Commit a container request for C{owner_uuid} and create its container (state
        C{Queued}) with the same image, command, environment, working directory and
        published ports.  Every request gets a container of its own: the registry never
        reuses one.

        @param properties: the request's own properties (Arvados' C{properties}: a JSON
            object).
        @raise NotFound: no such user.
        @raise ValueError: malformed command, environment, published ports or properties.
        """
        command_t = tuple(command)
        if not all(isinstance(a, str) for a in command_t):
            raise ValueError("the command must be a list of strings")
        env = dict(environment or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("the environment must map strings to strings")
        ports = normalize_published_ports(published_ports)
        props = dict(properties or {})
        if not all(isinstance(k, str) for k in props):
            raise ValueError("properties must be a JSON object")
        props_json = json.dumps(props)
        cr_uuid = self._new_uuid(CONTAINER_REQUEST_INFIX)
        c_uuid = self._new_uuid(CONTAINER_INFIX)
        created = self._now()
        now = format_time(created)
        shared = (
            container_image,
            json.dumps(list(command_t)),
            json.dumps(env),
            cwd,
            json.dumps(ports),
        )
        with self._transaction(write=True) as conn:
            self._require_user(conn, owner_uuid)
            conn.execute(
                "INSERT INTO containers (uuid, state, container_image, command, environment,"
                " cwd, published_ports, created_at, modified_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c_uuid, QUEUED, *shared, now, now),
            )
            conn.execute(
                "INSERT INTO container_requests (uuid, owner_uuid, modified_by_user_uuid, name,"
                " state, container_uuid, container_image, command, environment, cwd,"
                " published_ports, created_at, modified_at, properties)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cr_uuid,
                    owner_uuid,
                    owner_uuid,
                    name,
                    "Committed",
                    c_uuid,
                    *shared,
                    now,
                    now,
                    props_json,
                ),
            )
        return ContainerRequest(
            uuid=cr_uuid,
            owner_uuid=owner_uuid,
            modified_by_user_uuid=owner_uuid,
            name=name,
            state="Committed",
            container_uuid=c_uuid,
            container_image=container_image,
            command=command_t,
            environment=env,
            cwd=cwd,
            published_ports=ports,
            created_at=created,
            properties=props,
        )

    _CR_COLUMNS = (
        "uuid, owner_uuid, modified_by_user_uuid, name, state, container_uuid, container_image,"
        " command, environment, cwd, published_ports, created_at, properties"
    )

    @staticmethod
    def _container_request(row: tuple[Any, ...]) -> ContainerRequest:
        return ContainerRequest(
            uuid=row[0],
            owner_uuid=row[1],
            modified_by_user_uuid=row[2],
            name=row[3],
            state=row[4],
            container_uuid=row[5],
            container_image=row[6],
            command=tuple(json.loads(row[7])),
            environment=json.loads(row[8]),
            cwd=row[9],
            published_ports=json.loads(row[10]),
            created_at=parse_time(row[11]),
            properties=json.loads(row[12]),
        )

    def get_container_request(self, uuid: str) -> ContainerRequest:
        """@raise NotFound: no such container request."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                f"SELECT {self._CR_COLUMNS} FROM container_requests WHERE uuid = ?", (uuid,)
            ).fetchone()
        if row is None:
            raise NotFound(f"There is no container request {uuid}.")
        return self._container_request(row)

    def container_requests_for(self, container_uuid: str) -> list[ContainerRequest]:
        """Every container request that uses C{container_uuid}, oldest first; maybe none."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {self._CR_COLUMNS} FROM container_requests WHERE container_uuid = ?"
                " ORDER BY created_at, uuid",
                (container_uuid,),
            ).fetchall()
        return [self._container_request(r) for r in rows]

    def list_container_requests(self, owner_uuid: str | None = None) -> list[ContainerRequest]:
        """Every container request, or those of C{owner_uuid}, oldest first."""
        query = f"SELECT {self._CR_COLUMNS} FROM container_requests"
        params: tuple[str, ...] = ()
        if owner_uuid is not None:
            query, params = query + " WHERE owner_uuid = ?", (owner_uuid,)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY created_at, uuid", params).fetchall()
        return [self._container_request(r) for r in rows]

    _C_COLUMNS = (
        "uuid, state, gateway_address, exit_code, started_at, finished_at, container_image,"
        " command, environment, cwd, published_ports, listening_ports, runtime_status,"
        " interactive_session_started"
    )

    @staticmethod
    def _container(row: tuple[Any, ...]) -> Container:
        return Container(
            uuid=row[0],
            state=row[1],
            gateway_address=row[2],
            exit_code=row[3],
            started_at=None if row[4] is None else parse_time(row[4]),
            finished_at=None if row[5] is None else parse_time(row[5]),
            container_image=row[6],
            command=tuple(json.loads(row[7])),
            environment=json.loads(row[8]),
            cwd=row[9],
            published_ports=json.loads(row[10]),
            listening_ports=tuple(json.loads(row[11])),
            runtime_status=json.loads(row[12]),
            interactive_session_started=bool(row[13]),
        )

    def _select_container(self, conn: sqlite3.Connection, uuid: str) -> Container:
        row = conn.execute(
            f"SELECT {self._C_COLUMNS} FROM containers WHERE uuid = ?", (uuid,)
        ).fetchone()
        if row is None:
            raise NotFound(f"There is no container {uuid}.")
        return self._container(row)

    def get_container(self, uuid: str) -> Container:
        """@raise NotFound: no such container."""
        with self._transaction(write=False) as conn:
            return self._select_container(conn, uuid)

    def list_containers(self, state: str | None = None) -> list[Container]:
        """Every container, or those in C{state}, oldest first."""
        query = f"SELECT {self._C_COLUMNS} FROM containers"
        params: tuple[str, ...] = ()
        if state is not None:
            query, params = query + " WHERE state = ?", (state,)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY created_at, uuid", params).fetchall()
        return [self._container(r) for r in rows]

    def lock_container(self, uuid: str) -> bool:
        """
        Atomically move a container from C{Queued} to C{Locked}, so exactly one dispatcher
        runs it.

        @return: C{True} if this call locked it; C{False} if it was not C{Queued}.
        @raise NotFound: no such container.
        """
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE containers SET state = ?, modified_at = ? WHERE uuid = ? AND state = ?",
                (LOCKED, format_time(self._now()), uuid, QUEUED),
            )
            if cursor.rowcount == 1:
                return True
            if conn.execute("SELECT 1 FROM containers WHERE uuid = ?", (uuid,)).fetchone() is None:
                raise NotFound(f"There is no container {uuid}.")
            return False

    def update_container(self, uuid: str, /, **changes: Any) -> Container:
        """
        Change fields of a container: any of L{UPDATABLE_CONTAINER_FIELDS}.

        Moving to C{Running} sets C{started_at} (unless already set); moving to C{Complete} or
        C{Cancelled} sets C{finished_at} (unless already set) and marks the container's
        requests C{Final}.  A container in a final state never changes state again.
        C{interactive_session_started} may only become true, while the container is Running.

        @return: the updated container.
        @raise ValueError: an unknown field, a malformed value, an unknown state, a state
            change out of a final state, or a change of C{interactive_session_started} other
            than setting it while Running.
        @raise NotFound: no such container.
        """
        unknown = set(changes) - UPDATABLE_CONTAINER_FIELDS
        if unknown:
            raise ValueError(f"cannot change container field(s): {', '.join(sorted(unknown))}")
        columns = _container_columns(changes)
        now = format_time(self._now())
        with self._transaction(write=True) as conn:
            old = self._select_container(conn, uuid)
            new_state = changes.get("state", old.state)
            if (
                "interactive_session_started" in changes
                and changes["interactive_session_started"] != old.interactive_session_started
                and (not changes["interactive_session_started"] or new_state != RUNNING)
            ):
                # As in Arvados (Container#validate_change): set while Running, never cleared.
                raise ValueError(
                    f"container {uuid}: interactive_session_started can only be set, while Running"
                )
            if new_state != old.state:
                if old.state in FINAL_STATES:
                    raise ValueError(f"container {uuid} is {old.state}: its state is final")
                if new_state == RUNNING and old.started_at is None:
                    columns["started_at"] = now
                if new_state in FINAL_STATES:
                    if old.finished_at is None:
                        columns["finished_at"] = now
                    conn.execute(
                        "UPDATE container_requests SET state = 'Final', modified_at = ?"
                        " WHERE container_uuid = ?",
                        (now, uuid),
                    )
            columns["modified_at"] = now
            assignments = ", ".join(f"{name} = ?" for name in columns)
            conn.execute(
                f"UPDATE containers SET {assignments} WHERE uuid = ?", (*columns.values(), uuid)
            )
            return self._select_container(conn, uuid)

    # -- permissions -------------------------------------------------------------------------

    def grant_permission(self, user_uuid: str, target_uuid: str, level: str) -> Link:
        """
        Give C{user_uuid} C{level} on C{target_uuid} with a permission link.  Granting a level
        the user already holds by a link returns that link.

        @raise ValueError: C{level} is not one of L{LEVELS}, or C{target_uuid} is malformed.
        @raise NotFound: no such user, or no such target record.
        """
        if level not in LEVELS:
            raise ValueError(f"permission level must be one of {', '.join(LEVELS)}: {level!r}")
        table = _TABLES.get(uuid_infix(target_uuid))
        now = self._now()
        with self._transaction(write=True) as conn:
            self._require_user(conn, user_uuid)
            if (
                table is None
                or conn.execute(f"SELECT 1 FROM {table} WHERE uuid = ?", (target_uuid,)).fetchone()
                is None
            ):
                raise NotFound(f"There is no record {target_uuid}.")
            row = conn.execute(
                "SELECT uuid, link_class, name, tail_uuid, head_uuid, owner_uuid, created_at"
                " FROM links WHERE link_class = 'permission' AND tail_uuid = ? AND head_uuid = ?"
                " AND name = ?",
                (user_uuid, target_uuid, level),
            ).fetchone()
            if row is not None:
                return _link(row)
            link = Link(
                uuid=self._new_uuid(LINK_INFIX),
                link_class="permission",
                name=level,
                tail_uuid=user_uuid,
                head_uuid=target_uuid,
                owner_uuid=system_user_uuid(self.cluster_id),
                created_at=now,
            )
            conn.execute(
                "INSERT INTO links (uuid, owner_uuid, link_class, name, tail_uuid, head_uuid,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    link.uuid,
                    link.owner_uuid,
                    link.link_class,
                    link.name,
                    link.tail_uuid,
                    link.head_uuid,
                    format_time(now),
                ),
            )
        return link

    def get_link(self, uuid: str) -> Link:
        """@raise NotFound: no such link."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT uuid, link_class, name, tail_uuid, head_uuid, owner_uuid, created_at"
                " FROM links WHERE uuid = ?",
                (uuid,),
            ).fetchone()
        if row is None:
            raise NotFound(f"There is no link {uuid}.")
        return _link(row)

    def permission_level(self, user_uuid: str, target_uuid: str) -> str | None:
        """
        The strongest permission C{user_uuid} holds on C{target_uuid}: C{can_manage} if the
        user owns it (container requests and tokens have owners; containers belong to the
        system, so for them only links count), else the strongest permission link.  Admin
        rights are not considered here: L{Credentials.is_admin} says that.

        @return: one of L{LEVELS}, or C{None} for no permission, an unknown target, or a
            malformed UUID.
        """
        if not UUID_RE.match(target_uuid):
            return None
        owned_in = _OWNED_TABLES.get(uuid_infix(target_uuid))
        with self._transaction(write=False) as conn:
            if (
                owned_in is not None
                and conn.execute(
                    f"SELECT 1 FROM {owned_in} WHERE uuid = ? AND owner_uuid = ?",
                    (target_uuid, user_uuid),
                ).fetchone()
            ):
                return CAN_MANAGE
            names = conn.execute(
                "SELECT DISTINCT name FROM links WHERE link_class = 'permission'"
                " AND tail_uuid = ? AND head_uuid = ?",
                (user_uuid, target_uuid),
            ).fetchall()
        ranks = [LEVELS.index(n) for (n,) in names if n in LEVELS]
        return LEVELS[max(ranks)] if ranks else None

    # -- any record --------------------------------------------------------------------------

    def get(self, uuid: str) -> dict[str, Any]:
        """
        Any record by UUID, as an Arvados-style JSON-able dict (see L{to_json}).

        @raise ValueError: C{uuid} is not shaped like an Arvados UUID.
        @raise NotFound: no such record.
        """
        getter: dict[str, Callable[[str], Any]] = {
            USER_INFIX: self.get_user,
            TOKEN_INFIX: self.get_token,
            CONTAINER_REQUEST_INFIX: self.get_container_request,
            CONTAINER_INFIX: self.get_container,
            LINK_INFIX: self.get_link,
        }
        get_one = getter.get(uuid_infix(uuid))
        if get_one is None:
            raise NotFound(f"There is no record {uuid}: the registry keeps no records of its type.")
        return to_json(get_one(uuid))


_TABLES = {
    USER_INFIX: "users",
    TOKEN_INFIX: "api_client_authorizations",
    CONTAINER_REQUEST_INFIX: "container_requests",
    CONTAINER_INFIX: "containers",
    LINK_INFIX: "links",
}
_OWNED_TABLES = {
    CONTAINER_REQUEST_INFIX: "container_requests",
    TOKEN_INFIX: "api_client_authorizations",
}


def _link(row: tuple[Any, ...]) -> Link:
    return Link(
        uuid=row[0],
        link_class=row[1],
        name=row[2],
        tail_uuid=row[3],
        head_uuid=row[4],
        owner_uuid=row[5],
        created_at=parse_time(row[6]),
    )


def _container_columns(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Check the values of a container update and turn them into column values."""
    columns: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "state":
            if value not in STATES:
                raise ValueError(f"unknown container state {value!r}")
            columns[name] = value
        elif name == "gateway_address":
            if not isinstance(value, str):
                raise ValueError("gateway_address must be a string")
            columns[name] = value
        elif name == "exit_code":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError("exit_code must be an integer or None")
            columns[name] = value
        elif name == "listening_ports":
            ports = list(value)
            if not all(
                isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports
            ):
                raise ValueError("listening_ports must be port numbers between 1 and 65535")
            columns[name] = json.dumps(sorted(set(ports)))
        elif name == "runtime_status":
            if not isinstance(value, Mapping):
                raise ValueError("runtime_status must be a mapping")
            columns[name] = json.dumps(dict(value))
        elif name == "interactive_session_started":
            if not isinstance(value, bool):
                raise ValueError("interactive_session_started must be true or false")
            columns[name] = int(value)
    return columns
