"""The PostgreSQL database of a dispatcher: where its units of work, outbox and inbox live.

::

    from iambus.database import Database

    db = Database("postgresql://app@127.0.0.1/shop")          # asyncpg, pooled
    db = Database(create_async_engine("postgresql+asyncpg://app@127.0.0.1/shop"))
    dp = Dispatcher(transport="redis://...", service="orders", routes=ROUTES, database=db)

A ``Database`` is made from a DSN (an asyncpg pool is made when it opens), an
``asyncpg.Pool``, or a SQLAlchemy ``AsyncEngine`` on the asyncpg driver; ``import iambus``
imports neither driver. It hands out transactions to units of work (``unit_of_work``),
and plain connections to the relay (``relay``).

Its tables are two, named by ``schema`` and ``prefix`` (``iambus_outbox``,
``iambus_inbox`` by default): ``iambus db init`` creates them, ``Database.ddl()`` is the
same SQL for a migration tool, and ``Database.metadata()`` the same tables as SQLAlchemy
``MetaData`` for Alembic. What the columns mean is in docs/outbox.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .errors import ImproperlyConfigured, bad_option, check_seconds
from .transports import redact

__all__ = ["Database"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "iambus_"
MAX_PREFIX = 40
INBOX_RETENTION = 7 * 24 * 3600.0  # seconds an inbox record is kept: a week of redeliveries
NOTIFY_WAIT = 5.0  # seconds close() gives a wake-up of the relays on its way
NOTIFY_INTERVAL = 0.005
"""Seconds from one ``NOTIFY`` of ``notify_relays()`` to the next: the commits meanwhile
share the one that follows (a relay wakes at most this much later than it could)."""
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# (column, SQL type and constraints) of each table: the one description DDL, the SQLAlchemy
# metadata and the shape check are all made from.
OUTBOX_COLUMNS = (
    ("position", "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    ("lane", "smallint NOT NULL"),
    ("address", "text NOT NULL"),
    ("message_id", "text NOT NULL"),
    ("name", "text NOT NULL"),
    ("message_key", "text"),
    ("payload", "bytea NOT NULL"),
    ("content_type", "text NOT NULL"),
    ("correlation_id", "text"),
    ("causation_id", "text"),
    ("headers", "jsonb NOT NULL DEFAULT '{}'"),
    ("created_at", "double precision NOT NULL"),
    ("stored_at", "timestamptz NOT NULL DEFAULT now()"),
    ("attempts", "integer NOT NULL DEFAULT 0"),
    ("last_error", "text"),
    ("parked_at", "timestamptz"),
)
INBOX_COLUMNS = (
    ("message_id", "text NOT NULL"),
    ("handler", "text NOT NULL"),
    ("handled_at", "timestamptz NOT NULL DEFAULT now()"),
    # The answer a command's requester was sent (its payload and content type), kept to
    # answer a redelivery the record skips; NULL for events and commands without one.
    ("answer", "bytea"),
    ("answer_type", "text"),
)
TYPES = {
    "bigint": ("bigint", "integer"),
    "smallint": ("smallint", "integer", "bigint"),
    "integer": ("integer", "bigint"),
    "text": ("text", "character varying"),
    "bytea": ("bytea",),
    "jsonb": ("jsonb", "json"),
    "double precision": ("double precision",),
    "timestamptz": ("timestamp with time zone", "timestamp without time zone"),
}
"""The types a column may have, by the type in its SQL above (PostgreSQL's names, without
length: a table made by hand with ``varchar``, ``integer`` or ``json`` works as well:
PostgreSQL casts ``jsonb`` to ``json`` on assignment, and both read as text)."""
ADDED_INBOX_COLUMNS = ("answer", "answer_type")
"""Inbox columns added after the table's first shape: ``ddl()`` adds them to an older
table (they are nullable), so ``iambus db init`` migrates it."""


class Database:
    """A PostgreSQL database, its connections and the names of iambus's tables in it."""

    def __init__(
        self,
        source: Any,
        *,
        schema: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        inbox_retention: float = INBOX_RETENTION,
        pool: Mapping[str, Any] | None = None,
    ) -> None:
        if schema is not None and not _IDENTIFIER.match(str(schema)):
            raise bad_option(
                "schema", schema, "None or a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)"
            )
        if not isinstance(prefix, str) or not (prefix == "" or _IDENTIFIER.match(prefix)):
            raise bad_option(
                "prefix", prefix, "'' or a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)"
            )
        if len(prefix) > MAX_PREFIX:
            raise bad_option(
                "prefix",
                prefix,
                f"at most {MAX_PREFIX} characters (PostgreSQL names are 63 at most, and "
                f"iambus adds its own to the prefix)",
            )
        check_seconds("inbox_retention", inbox_retention)
        if pool is not None and not isinstance(pool, Mapping):
            raise bad_option("pool", pool, "None or a mapping of asyncpg.create_pool() options")
        self.kind = _kind_of(source)
        if pool is not None and self.kind != "dsn":
            raise ImproperlyConfigured(
                "pool= sets up the pool a Database makes from a DSN; a pool or engine of "
                "yours is used as it is: size it where you make it"
            )
        # The pool made from a DSN: big enough for a worker's handlers (Limits.concurrency
        # of 32 by default) and its relay (one listening connection, one for a pass).
        self.pool_options = {"min_size": 1, "max_size": 40, **(pool or {})}
        self._opening = asyncio.Lock()
        self.source = source
        self.schema = schema
        self.prefix = prefix
        self.inbox_retention = float(inbox_retention)
        self._pool: Any = source if self.kind == "asyncpg-pool" else None
        self._owned_pool = False
        self._answers: bool | None = None  # the inbox keeps answers (None: not known yet)
        self._notifying: asyncio.Task[None] | None = None  # a NOTIFY on its way
        self._notify_again = False  # asked for while one was on its way

    def __repr__(self) -> str:
        return f"<Database {self.kind} {self.outbox}>"

    # -- names ------------------------------------------------------------------------

    def _table(self, name: str) -> str:
        table = f'"{self.prefix}{name}"'
        return table if self.schema is None else f'"{self.schema}".{table}'

    @property
    def outbox(self) -> str:
        """The outbox table's quoted, qualified name (for SQL)."""
        return self._table("outbox")

    @property
    def inbox(self) -> str:
        """The inbox table's quoted, qualified name (for SQL)."""
        return self._table("inbox")

    @property
    def channel(self) -> str:
        """The ``NOTIFY`` channel a commit that wrote outbox rows wakes the relays on."""
        return f"{self.schema or 'public'}.{self.prefix}outbox"[:63]

    @property
    def lock_space(self) -> int:
        """The first key of the relays' two-key advisory locks (per outbox table)."""
        return _int32(zlib.crc32(self.outbox.encode()))

    # -- schema -----------------------------------------------------------------------

    def ddl(self) -> str:
        """The SQL that creates iambus's tables (idempotent: ``IF NOT EXISTS``)."""
        lines = []
        if self.schema is not None:
            lines.append(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";')
        lines.append(_create(self.outbox, OUTBOX_COLUMNS))
        lines.append(
            f'CREATE INDEX IF NOT EXISTS "{self.prefix}outbox_lane" ON {self.outbox} '
            f"(lane, position) WHERE parked_at IS NULL;"
        )
        lines.append(_create(self.inbox, INBOX_COLUMNS, primary_key="message_id, handler"))
        # Added to an inbox of the earlier shape; the check first, as an ALTER TABLE
        # locks the table (ACCESS EXCLUSIVE) even when it adds nothing.
        columns = dict(INBOX_COLUMNS)
        added = ", ".join(
            f"ADD COLUMN IF NOT EXISTS {name} {columns[name]}" for name in ADDED_INBOX_COLUMNS
        )
        lines.append(
            f"DO $$ BEGIN IF (SELECT count(*) FROM pg_attribute WHERE attrelid = "
            f"'{self.inbox}'::regclass AND attname IN ({_quoted(ADDED_INBOX_COLUMNS)}) AND "
            f"NOT attisdropped) < {len(ADDED_INBOX_COLUMNS)} THEN "
            f"ALTER TABLE {self.inbox} {added}; END IF; END $$;"
        )
        lines.append(
            f'CREATE INDEX IF NOT EXISTS "{self.prefix}inbox_handled_at" ON {self.inbox} '
            f"(handled_at);"
        )
        return "\n".join(lines) + "\n"

    def metadata(self, metadata: Any = None) -> Any:
        """iambus's tables as SQLAlchemy ``Table`` objects in ``metadata`` (a new
        ``MetaData`` if None), for Alembic's autogenerate. Needs SQLAlchemy."""
        try:
            import sqlalchemy as sa
            from sqlalchemy.dialects import postgresql
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImproperlyConfigured(
                "Database.metadata() needs SQLAlchemy: pip install 'iambus[sqlalchemy]'"
            ) from exc
        metadata = sa.MetaData() if metadata is None else metadata
        sa.Table(
            f"{self.prefix}outbox",
            metadata,
            sa.Column("position", sa.BigInteger, sa.Identity(always=True), primary_key=True),
            sa.Column("lane", sa.SmallInteger, nullable=False),
            sa.Column("address", sa.Text, nullable=False),
            sa.Column("message_id", sa.Text, nullable=False),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("message_key", sa.Text),
            sa.Column("payload", sa.LargeBinary, nullable=False),
            sa.Column("content_type", sa.Text, nullable=False),
            sa.Column("correlation_id", sa.Text),
            sa.Column("causation_id", sa.Text),
            sa.Column("headers", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'")),
            sa.Column("created_at", sa.Double, nullable=False),
            sa.Column(
                "stored_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.func.now(),
            ),
            sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
            sa.Column("last_error", sa.Text),
            sa.Column("parked_at", sa.DateTime(timezone=True)),
            sa.Index(
                f"{self.prefix}outbox_lane",
                "lane",
                "position",
                postgresql_where=sa.text("parked_at IS NULL"),
            ),
            schema=self.schema,
        )
        sa.Table(
            f"{self.prefix}inbox",
            metadata,
            sa.Column("message_id", sa.Text, primary_key=True),
            sa.Column("handler", sa.Text, primary_key=True),
            sa.Column(
                "handled_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.func.now(),
            ),
            sa.Column("answer", sa.LargeBinary),
            sa.Column("answer_type", sa.Text),
            sa.Index(f"{self.prefix}inbox_handled_at", "handled_at"),
            schema=self.schema,
        )
        return metadata

    async def create(self) -> None:
        """Create iambus's tables if they do not exist (``iambus db init``)."""
        async with self.connection() as conn:
            await conn.execute(self.ddl())

    async def check(self) -> None:
        """Raise ``ImproperlyConfigured`` naming what is missing when a table is absent or
        lacks a column iambus uses, with the command that creates them. (An inbox of the
        earlier shape, without the answer columns, only gets a warning: see
        ``answers_kept``.)"""
        async with self.connection() as conn:
            for name, columns in (("outbox", OUTBOX_COLUMNS), ("inbox", INBOX_COLUMNS)):
                found = await self._columns(conn, self._table(name))
                table = f"{self.prefix}{name}"
                where = f"{self.schema}.{table}" if self.schema else table
                if not found:
                    looked = "" if self.schema else " in the search_path"
                    raise ImproperlyConfigured(
                        f"the table {where} does not exist{looked}; create iambus's tables "
                        f"with `iambus db init --database DSN{self._options()}` (or apply "
                        f"Database.ddl() / Database.metadata() in your migrations)"
                    )
                missing = [column for column, _ in columns if column not in found]
                wrong = [
                    f"{column} is {found[column]} (iambus's is {_type_of(sql)})"
                    for column, sql in columns
                    if column in found and found[column] not in TYPES[_type_of(sql)]
                ]
                if wrong:
                    raise ImproperlyConfigured(
                        f"the table {where} has column(s) of another type: "
                        f"{', '.join(wrong)}: it was made by another version or by hand; "
                        f"compare it with Database.ddl(), and migrate it (or drop it and "
                        f"run `iambus db init`)"
                    )
                if name == "inbox":
                    self._learn_answers(found, where)
                    missing = [column for column in missing if column not in ADDED_INBOX_COLUMNS]
                if missing:
                    raise ImproperlyConfigured(
                        f"the table {where} has no column(s) {', '.join(missing)}: it was "
                        f"made by another version or by hand; compare it with "
                        f"Database.ddl(), and migrate it (or drop it and run `iambus db "
                        f"init`)"
                    )

    async def _columns(self, conn: Any, table: str) -> dict[str, str]:
        """The columns of ``table`` (quoted, as the SQL names it: without a schema, the
        first of the search_path that has it), with their types; none: no table.
        ``handled_at``'s type says its precision when it keeps less than microseconds:
        a unit of work tells the inbox record it made by ``handled_at = now()``
        (``inbox.claim_again``), which a rounded time never equals."""
        rows = await conn.fetch(
            "SELECT attname, format_type(atttypid, CASE WHEN attname = 'handled_at' AND "
            "atttypmod BETWEEN 0 AND 5 THEN atttypmod END) AS type FROM pg_attribute "
            "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            table,
        )
        return {row["attname"]: row["type"] for row in rows}

    async def answers_kept(self, conn: Any) -> bool:
        """Whether the inbox has the columns that keep a command's answer (an inbox of the
        earlier shape has not: answers are not kept, as before, with a warning once).
        Learnt once (here, on ``conn``, or by ``check``); a table migrated meanwhile is
        seen after a restart."""
        if self._answers is None:
            self._learn_answers(await self._columns(conn, self.inbox), self.inbox)
        return self._answers is True

    def _learn_answers(self, found: dict[str, str], where: str) -> None:
        kept = set(ADDED_INBOX_COLUMNS) <= found.keys()
        if not kept and self._answers is not False:  # (said once)
            self._no_answers(where)
        self._answers = kept

    def _no_answers(self, where: str) -> None:
        logger.warning(
            "iambus: the inbox %s has no columns %s (made by an earlier version): commands' "
            "answers are not kept, and a redelivery the inbox skips is not answered; add "
            "them with `iambus db init --database DSN%s` (or Database.ddl() / .metadata() "
            "in your migrations), then restart",
            where,
            ", ".join(ADDED_INBOX_COLUMNS),
            self._options(),
        )

    def _options(self) -> str:
        schema = f" --schema {self.schema}" if self.schema else ""
        prefix = f" --prefix {self.prefix}" if self.prefix != DEFAULT_PREFIX else ""
        return schema + prefix

    # -- connections ------------------------------------------------------------------

    async def open(self) -> None:
        """Make the pool of a DSN (a pool or engine passed in is used as it is)."""
        if self.kind != "dsn" or self._pool is not None:
            return
        async with self._opening:  # first uses at once make one pool
            if self._pool is None:
                asyncpg = _asyncpg()
                try:
                    self._pool = await asyncpg.create_pool(self.source, **self.pool_options)
                except Exception as exc:
                    # The driver's error, as it is (a caller may catch OSError), saying
                    # which database it was about.
                    exc.add_note(f"iambus: connecting to the database {redact(self.source)}")
                    raise
                self._owned_pool = True

    async def close(self, timeout: float | None = None) -> None:
        """Close the pool this database made from a DSN (never one passed in), once a
        wake-up of the relays on its way has gone out.

        It waits for the connections lent out to come back, ``timeout`` seconds at most
        (None: no limit); then it closes those too (their transactions roll back)."""
        notifying = self._notifying
        if notifying is not None:
            _, late = await asyncio.wait([notifying], timeout=NOTIFY_WAIT)
            for task in late:
                task.cancel()
        pool, self._pool = self._pool, (None if self._owned_pool else self._pool)
        if not self._owned_pool or pool is None:
            return
        self._owned_pool = False
        try:
            async with asyncio.timeout(timeout):
                await pool.close()
        except TimeoutError:
            logger.warning("iambus: %r: connections still lent out at its close were closed", self)
            pool.terminate()

    def notify_relays(self) -> None:
        """Wake the relays: rows were committed to the outbox (a ``NOTIFY`` on
        ``channel``). It is sent in the background, on a connection of this database, at
        once unless one went out less than ``NOTIFY_INTERVAL`` ago; the calls made
        meanwhile share the next. One that fails is logged at DEBUG: the relays poll."""
        if self._notifying is not None:
            self._notify_again = True
            return
        self._notifying = asyncio.get_running_loop().create_task(
            self._notify(), name="iambus-notify-relays"
        )

    async def _notify(self) -> None:
        try:
            again = True
            while again:
                self._notify_again = False
                async with self.connection() as conn:
                    await conn.execute("SELECT pg_notify($1, '')", self.channel)
                await asyncio.sleep(NOTIFY_INTERVAL)
                # No await between reading the flag and the end of the task: a call that
                # comes after this read starts a task of its own.
                again = self._notify_again
        except Exception as exc:
            logger.debug("iambus: waking the relays of %s failed: %r", self.outbox, exc)
        finally:
            self._notifying = None

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """An asyncpg connection of this database, outside any transaction of ours.

        ``timeout``: seconds to wait for a connection (None: as long as it takes); then
        ``TimeoutError`` saying the pool is too small for its users."""
        async with contextlib.AsyncExitStack() as stack:
            waiting = asyncio.timeout(timeout)
            try:
                async with waiting:
                    conn = await stack.enter_async_context(self._lend())
            except TimeoutError:
                if not waiting.expired():  # the driver's own (connecting, say)
                    raise
                raise TimeoutError(
                    f"no connection of {self!r} came free within {timeout:g} s: its pool "
                    f"is too small for all that use it (a worker's handlers and its relay): "
                    f"give it more with Database(dsn, pool={{'max_size': N}}), or where you "
                    f"make your pool or engine (docs/database.md)"
                ) from None
            yield conn

    @contextlib.asynccontextmanager
    async def _lend(self) -> AsyncIterator[Any]:
        if self.kind == "sqlalchemy":
            async with self.source.connect() as sa_conn:
                raw = await sa_conn.get_raw_connection()
                driver = raw.driver_connection
                try:
                    yield driver
                finally:
                    if driver.is_closed():
                        # Terminated (by the server, or by a relay cut short): the engine
                        # must not lend it again.
                        await sa_conn.invalidate()
            return
        if self._pool is None:
            await self.open()
        async with self._pool.acquire() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        """A new session (SQLAlchemy ``AsyncSession``) or pooled asyncpg connection, not
        in a transaction yet: what a handler's unit of work runs on."""
        if self.kind == "sqlalchemy":
            from sqlalchemy.ext.asyncio import AsyncSession

            async with AsyncSession(self.source, expire_on_commit=False) as session:
                yield session
            return
        if self._pool is None:
            await self.open()
        async with self._pool.acquire() as conn:
            yield conn


def _type_of(sql: str) -> str:
    """The type of a column's SQL (its words before the first in capitals)."""
    return " ".join(itertools.takewhile(str.islower, sql.split()))


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _create(table: str, columns: tuple[tuple[str, str], ...], primary_key: str = "") -> str:
    body = [f"    {name} {sql}" for name, sql in columns]
    if primary_key:
        body.append(f"    PRIMARY KEY ({primary_key})")
    return f"CREATE TABLE IF NOT EXISTS {table} (\n" + ",\n".join(body) + "\n);"


def _int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _check_dsn(dsn: str) -> None:
    """A DSN whose hosts or ports the driver could not read is refused here, saying why,
    rather than at the first connection with a bare ValueError."""
    problem = _dsn_problem(dsn)
    if problem is not None:
        raise ImproperlyConfigured(
            f"database {redact(dsn)} is not a valid DSN: {problem} (percent-encode '@', "
            f"':', '/', '?' and '#' in the user and password); write it as "
            f"postgresql://user[:password]@host[:port][,host2[:port2]...]/db"
        )


def _dsn_problem(dsn: str) -> str | None:
    """What keeps the driver from reading ``dsn``'s hosts and ports, in words of ours:
    the parser's own quote the part it could not read, which may be the password's."""
    try:
        netloc = urllib.parse.urlsplit(dsn).netloc
    except ValueError:  # (the only one urlsplit raises: a '[' without its ']')
        return "an IPv6 address without its closing ']'"
    if netloc.count("@") > 1:
        return "more than one '@' before the host"
    for host in netloc.rpartition("@")[2].split(","):  # several hosts: h1,h2:5433
        try:
            urllib.parse.urlsplit(f"//{host}").port  # noqa: B018 - parsing is the check
        except ValueError as exc:
            if "out of range" in str(exc):
                return "a port over 65535"
            if "IPv6" in str(exc):
                return "an IPv6 address without its closing ']'"
            return "a port that is not a number"
    return None


def _kind_of(source: Any) -> str:
    """What ``source`` is, by its class's module: no driver is imported to tell."""
    if isinstance(source, str):
        if not source.startswith(("postgresql://", "postgres://")):
            raise bad_option(
                "database",
                redact(source),
                "a DSN 'postgresql://user@host/db', an asyncpg.Pool, or a SQLAlchemy "
                "AsyncEngine on the asyncpg driver",
            )
        _check_dsn(source)
        return "dsn"
    module = type(source).__module__
    if module.startswith("asyncpg") and hasattr(source, "acquire"):
        return "asyncpg-pool"
    if module.startswith("sqlalchemy") and hasattr(source, "sync_engine"):
        driver = source.sync_engine.dialect.driver
        if driver != "asyncpg":
            raise ImproperlyConfigured(
                f"iambus's outbox and inbox run on the asyncpg driver, and this engine "
                f"uses {driver!r}: create it with "
                f"create_async_engine('postgresql+asyncpg://...')"
            )
        return "sqlalchemy"
    raise bad_option(
        "database",
        source,
        "a DSN 'postgresql://user@host/db', an asyncpg.Pool, or a SQLAlchemy AsyncEngine "
        "on the asyncpg driver",
    )


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImproperlyConfigured(
            "a Database needs asyncpg: pip install 'iambus[postgres]'"
        ) from exc
    return asyncpg
