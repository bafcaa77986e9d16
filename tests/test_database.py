"""Database: its sources, table names, DDL, SQLAlchemy metadata and the shape check."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from iambus import Envelope, ImproperlyConfigured
from iambus.database import DEFAULT_PREFIX, Database
from iambus.inbox import claim, claim_again
from iambus.outbox import Outgoing, write
from iambus.relay import Relay
from iambus.transports.memory import MemoryTransport

from .conftest import POSTGRES_DSN, require


def test_names_follow_schema_and_prefix() -> None:
    db = Database(POSTGRES_DSN, schema="shop", prefix="bus_")
    assert db.outbox == '"shop"."bus_outbox"'
    assert db.inbox == '"shop"."bus_inbox"'
    assert db.channel == "shop.bus_outbox"
    assert Database(POSTGRES_DSN).outbox == '"iambus_outbox"'


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"schema": "a;drop"}, "schema"),
        ({"prefix": "x y"}, "prefix"),
        ({"inbox_retention": 0}, "inbox_retention"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], named: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=rf"^{named} must be"):
        Database(POSTGRES_DSN, **options)  # type: ignore[arg-type]


def test_a_source_that_is_no_database_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="database must be a DSN 'postgresql://"):
        Database("mysql://localhost/x")
    with pytest.raises(ImproperlyConfigured, match="database must be a DSN"):
        Database(object())


def test_an_engine_on_another_driver_is_refused() -> None:
    # (psycopg is not installed here: an asyncpg engine stands in, told it is another)
    engine = create_async_engine("postgresql+asyncpg://u@127.0.0.1/x")
    engine.sync_engine.dialect.driver = "psycopg"
    with pytest.raises(ImproperlyConfigured, match=r"on the asyncpg driver.*'psycopg'"):
        Database(engine)


def test_metadata_matches_the_ddl() -> None:
    db = Database(POSTGRES_DSN, schema="s", prefix="p_")
    metadata = db.metadata()
    assert sorted(metadata.tables) == ["s.p_inbox", "s.p_outbox"]
    tables = db.ddl().split("CREATE TABLE")[1:]
    for name, table in zip(["s.p_outbox", "s.p_inbox"], tables, strict=True):
        lines = table.split(");")[0].splitlines()[1:]
        columns = [line.split()[0] for line in lines if not line.strip().startswith("PRIMARY")]
        assert sorted(columns) == sorted(metadata.tables[name].columns.keys()), name


@contextlib.asynccontextmanager
async def fresh_database(prefix: str = DEFAULT_PREFIX) -> AsyncIterator[Database]:
    """A Database on PostgreSQL in a schema of its own, dropped at the end."""
    require("postgres")
    schema = f"test_{uuid.uuid4().hex[:10]}"
    db = Database(POSTGRES_DSN, schema=schema, prefix=prefix)
    try:
        yield db
    finally:
        async with db.connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await db.close()


async def test_create_is_idempotent_and_check_names_what_is_missing() -> None:
    async with fresh_database(prefix="t_") as db:
        schema = db.schema
        with pytest.raises(
            ImproperlyConfigured,
            match=rf"{schema}.t_outbox does not exist.*"
            rf"iambus db init --database DSN --schema {schema} --prefix t_",
        ):
            await db.check()
        await db.create()
        await db.create()  # again: nothing happens
        await db.check()
        async with db.connection() as conn:
            await conn.execute(f"ALTER TABLE {db.inbox} DROP COLUMN handled_at")
        with pytest.raises(ImproperlyConfigured, match=r"t_inbox has no column\(s\) handled_at"):
            await db.check()


async def test_check_names_the_columns_of_a_type_iambus_cannot_write() -> None:
    """A table made by hand with a column of another type: said at the check (a relay's
    start), not by the driver at the first write (``invalid input for query argument
    $6: b'...' (expected str, got bytes)``). Types that work as well are taken."""
    async with fresh_database(prefix="t_") as db:
        await db.create()
        async with db.connection() as conn:
            await conn.execute(
                f"ALTER TABLE {db.outbox} ALTER COLUMN address TYPE varchar(200), "
                f"ALTER COLUMN lane TYPE integer"
            )
        await db.check()  # they work
        async with db.connection() as conn:
            await conn.execute(
                f"ALTER TABLE {db.outbox} ALTER COLUMN payload TYPE text USING '', "
                f"ALTER COLUMN created_at TYPE timestamptz USING now()"
            )
        with pytest.raises(
            ImproperlyConfigured,
            match=r"t_outbox has column\(s\) of another type: payload is text \(iambus's is "
            r"bytea\), created_at is timestamp with time zone \(iambus's is double "
            r"precision\).*Database.ddl\(\)",
        ):
            await db.check()


async def test_check_takes_json_headers_which_work(database: Database) -> None:
    """An outbox made by hand (or a migration's ``sa.JSON``) with ``json`` headers: iambus
    writes them through a cast PostgreSQL makes on assignment, and reads their text, as
    of ``jsonb``: check() takes it, and a relay (whose start checks) sends them."""
    async with database.connection() as conn:
        await conn.execute(f"ALTER TABLE {database.outbox} ALTER COLUMN headers TYPE json")
    await database.check()
    transport = MemoryTransport()
    await transport.declare("things", "g", from_start=True)
    sent = [Envelope("T", b"{}", headers={"tenant": "7"}), Envelope("T", b"{}")]
    async with database.connection() as conn, conn.transaction():
        await write(conn, database, [Outgoing("things", e) for e in sent])
    assert await Relay(database, transport).run_once() == 2
    got = await transport.receive("things", "g", consumer="c", limit=2, wait=0)
    assert [dict(delivery.envelope.headers) for delivery in got] == [{"tenant": "7"}, {}]


async def test_check_refuses_an_inbox_whose_handled_at_drops_the_microseconds(
    database: Database,
) -> None:
    """A unit of work that runs a handler again tells the inbox record it made from a
    redelivery's by ``handled_at = now()`` (``inbox.claim_again``): a column rounded to
    whole seconds never equals it, and the attempt run again would be skipped as a
    redelivery (the message lost). Its other timestamps may be rounded."""
    async with database.connection() as conn:
        await conn.execute(
            f"ALTER TABLE {database.outbox} ALTER COLUMN stored_at TYPE timestamptz(0)"
        )
        await database.check()  # works
        await conn.execute(
            f"ALTER TABLE {database.inbox} ALTER COLUMN handled_at TYPE timestamptz(0)"
        )
        async with conn.transaction():  # what it breaks
            assert await claim(conn, database, "m", "h") is True
            assert await claim_again(conn, database, "m", "h") is False
    with pytest.raises(
        ImproperlyConfigured,
        match=r"inbox has column\(s\) of another type: handled_at is timestamp\(0\) with "
        r"time zone \(iambus's is timestamptz\)",
    ):
        await database.check()


async def test_check_finds_the_tables_where_the_search_path_finds_them(
    database: Database,
) -> None:
    """Without a schema, iambus's SQL names its tables unqualified: the first schema of
    the search_path that has them (not the first that exists, current_schema()) is the
    one check() looks at, as a schema of the user's own comes first by default
    ("$user", public) and the tables may be in a later one."""
    assert database.schema is not None
    empty = f"{database.schema}_mine"
    path = f'"{empty}", "{database.schema}"'
    on_path = Database(POSTGRES_DSN, pool={"server_settings": {"search_path": path}})
    try:
        async with on_path.connection() as conn:
            await conn.execute(f'CREATE SCHEMA "{empty}"')
            assert await conn.fetchval("SELECT current_schema()") == empty
        await on_path.check()  # the tables the SQL below finds
        async with on_path.connection() as conn:
            await conn.fetchval(f"SELECT count(*) FROM {on_path.outbox}")
    finally:
        async with on_path.connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{empty}"')
        await on_path.close()


async def test_init_adds_the_answer_columns_to_an_inbox_of_an_older_shape() -> None:
    async with fresh_database() as db:
        await db.create()
        async with db.connection() as conn:
            await conn.execute(f"INSERT INTO {db.inbox} (message_id, handler) VALUES ('m', 'h')")
            await conn.execute(
                f"ALTER TABLE {db.inbox} DROP COLUMN answer, DROP COLUMN answer_type"
            )
        await db.check()  # a warning, not an error: answers are not kept (test_inbox)
        async with db.connection() as conn:
            assert not await db.answers_kept(conn)
        await db.create()  # iambus db init
        again = Database(POSTGRES_DSN, schema=db.schema)  # (a restart)
        try:
            await again.check()
            async with again.connection() as conn:
                assert await again.answers_kept(conn)
                kept = await conn.fetch(f"SELECT message_id, answer FROM {db.inbox}")
            assert [tuple(row) for row in kept] == [("m", None)]  # the records are kept
        finally:
            await again.close()


async def test_init_leaves_an_inbox_of_the_current_shape_unlocked() -> None:
    """The step of `iambus db init` that adds the answer columns alters nothing once
    they are there: it does not queue behind a handler's open transaction on the inbox
    (and block every read of the inbox behind it)."""
    async with fresh_database() as db:
        await db.create()
        async with db.connection() as holder, holder.transaction():
            await holder.execute(f"INSERT INTO {db.inbox} (message_id, handler) VALUES ('m', 'h')")
            async with db.connection() as conn:
                (adding,) = [line for line in db.ddl().splitlines() if line.startswith("DO ")]
                await conn.execute("SET lock_timeout = '2s'")
                await conn.execute(adding)  # fails on the lock's timeout if it took it
                await conn.execute("RESET lock_timeout")


async def test_an_engine_gives_its_driver_connection(database: Database) -> None:
    engine = create_async_engine(POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        db = Database(engine, schema=database.schema)
        await db.check()
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await engine.dispose()


async def test_notify_relays_folds_the_calls_made_before_the_notify_goes_out(
    database: Database,
) -> None:
    heard: list[str] = []
    listener = await asyncpg.connect(POSTGRES_DSN)

    async def hear(count: int) -> None:
        deadline = asyncio.get_running_loop().time() + 5
        while len(heard) < count:
            assert asyncio.get_running_loop().time() < deadline, heard
            await listener.execute("SELECT 1")  # notifications arrive between statements

    try:
        await listener.add_listener(database.channel, lambda *args: heard.append(args[2]))
        for _ in range(20):  # twenty commits in a row: one NOTIFY, sent after them all
            database.notify_relays()
        await hear(1)
        database.notify_relays()  # a commit right after it: not lost, a NOTIFY follows
        await database.close()  # it lets the wake-up on its way go out first
        await hear(2)
        assert heard == [database.channel, database.channel]
    finally:
        await listener.close()


def test_a_prefix_too_long_for_postgresql_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="prefix must be at most 40 characters"):
        Database(POSTGRES_DSN, prefix="p" * 41)


def test_a_dsn_of_another_scheme_is_named_without_its_password() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        Database("postgresql+asyncpg://app:s3cret@127.0.0.1/shop")
    assert "s3cret" not in str(info.value)
    assert "app:***@127.0.0.1" in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("postgresql://app:s3cret@127.0.0.1:fivefour/shop", "a port that is not a number"),
        ("postgresql://app:s3cret@db1:5432,db2:99999/shop", "a port over 65535"),
        ("postgresql://app:s3cret@[::1/shop", "an IPv6 address without its closing ']'"),
        # An unencoded '#' or '@' in the password: the parser reads part of it as the port
        # (and would quote it in its error), or the host.
        ("postgresql://app:s3c#ret99@db:5432/shop", "a port that is not a number"),
        ("postgresql://app:s3c@ret:99@db:5432/shop", "more than one '@' before the host"),
    ],
)
def test_a_dsn_whose_address_cannot_be_read_is_refused_when_made(dsn: str, reason: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        Database(dsn)
    assert str(info.value).startswith("database postgresql://")
    assert f"is not a valid DSN: {reason} (percent-encode '@'" in str(info.value)
    assert "write it as postgresql://user[:password]@host[:port]" in str(info.value)
    assert "s3c" not in str(info.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@db1:5432,db2:5432/shop",  # several hosts
        "postgresql://app@[::1]:5432/shop",
        "postgresql:///shop?host=/var/run/postgresql",  # a unix socket
        "postgresql://app@/shop",
        "postgresql://app:p%40ss%3Aword@db/shop",  # reserved characters, encoded
    ],
)
def test_dsns_the_driver_reads_are_taken(dsn: str) -> None:
    assert Database(dsn).kind == "dsn"


async def test_a_database_that_refuses_says_which_it_was() -> None:
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    database = Database(f"postgresql://app:s3cret@127.0.0.1:{port}/shop")
    with pytest.raises(ConnectionRefusedError) as info:  # the driver's error, as it is
        async with database.connection():
            pass
    notes = getattr(info.value, "__notes__", [])
    assert notes == [
        f"iambus: connecting to the database postgresql://app:***@127.0.0.1:{port}/shop"
    ]


def test_pool_options_are_for_a_dsn_only() -> None:
    assert Database(POSTGRES_DSN, pool={"max_size": 3}).pool_options["max_size"] == 3
    engine = create_async_engine(POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"))
    with pytest.raises(ImproperlyConfigured, match="size it where you make it"):
        Database(engine, pool={"max_size": 3})


async def test_first_uses_at_once_make_one_pool(database: Database) -> None:
    db = Database(POSTGRES_DSN, schema=database.schema)
    try:

        async def use() -> object:
            async with db.connection() as conn:
                await conn.fetchval("SELECT 1")
            return db._pool

        pools = await asyncio.gather(*(use() for _ in range(5)))
        assert len({id(pool) for pool in pools}) == 1
    finally:
        await db.close()


async def test_close_does_not_wait_for_ever_on_a_connection_lent_out(database: Database) -> None:
    db = Database(POSTGRES_DSN, schema=database.schema)
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with db.connection() as conn:
            await conn.fetchval("SELECT 1")
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    await asyncio.wait_for(db.close(timeout=0.2), 5)  # returns: the held one is closed
    release.set()
    with contextlib.suppress(Exception):
        await holder


async def test_a_terminated_driver_connection_is_not_lent_again(database: Database) -> None:
    engine = create_async_engine(
        POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"), pool_size=1
    )
    db = Database(engine, schema=database.schema)
    try:
        async with db.connection() as conn:
            conn.terminate()  # as a relay cut short at its stop does
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await engine.dispose()
