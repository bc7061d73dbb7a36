"""The store's transaction engine, the same for every backend: one thread, group commit.

Every store call is a plain function of a `Tx` (a connection in a
transaction), queued to one dedicated thread, so the event loop never blocks
on the database and the writes of this process are serialised without lock
contention. The thread takes all the calls waiting at that moment and runs
them in ONE transaction, each inside its own SAVEPOINT (a failing call is
rolled back alone; a call alone in its transaction needs none), commits once,
and only then answers them all: under load, many SMTP transactions and
dispatch steps share one commit (one fsync), and each 250 still waits for its
own commit.

A process whose writes keep no client waiting (the worker) sets
`commit_wait_s`: while its store is busy (it committed within the last
BUSY_S), a write call waits up to that long for others to join its
transaction. On SQLite, where one process writes at a time, a burst of
2 000 mails on 20 connections then took half the worker transactions
(~240 instead of ~500-600), and the intake's total wait for the write lock
fell by about a fifth (see docs/performance.md). Idle, nothing waits: a lone
email is not delayed.

A call that mostly finds nothing to do (a claim, a poll of callbacks) is
marked `read_first`: its first statement is a SELECT of what is due. It
runs first outside any transaction, on a Tx that takes that one SELECT only;
if the call returns on what it read (nothing due), it is answered there,
without taking SQLite's write lock (the intake's 250s wait for it) or a
commit; at its next statement it runs again in the transaction (one SELECT
repeated when there is work). In a run of 500-number emails
one at a time, the worker committed ~11 transactions per email, ~5 of them
such polls that found nothing.

A backend (`Backend`) gives the connection, how to begin a transaction, and
which driver errors mean "cannot write now" (they become `StoreUnavailable`,
which intake answers with 451). `Tx.execute` takes `?` placeholders and
writes them the way the driver wants.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from mailbridge.store import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
U = TypeVar("U")
MAX_BATCH = 512  # store calls sharing one transaction (one commit)
BUSY_S = 0.05  # a commit this recent means the store is busy: commit_wait_s applies


class WriteNeeded(Exception):
    """A `read_first` call went past its first SELECT: it runs again in the transaction."""


class Tx:
    """A connection inside the engine's transaction, for the store's queries.

    `dialect` holds the few SQL spellings that differ between backends (the
    database clock, row locks for claims); everything else is the common subset
    of SQLite and PostgreSQL.
    """

    __slots__ = ("conn", "dialect", "shard", "_probe", "_pyformat")

    def __init__(
        self, conn: Any, dialect: Dialect, shard: str = "", first_select_only: bool = False
    ) -> None:
        self.conn = conn
        self.dialect = dialect
        self.shard = shard  # this process's own rows of shared counters
        # Outside a transaction (read_first): 1 while its one SELECT is still
        # allowed, 2 once used (any statement then raises WriteNeeded).
        self._probe = 1 if first_select_only else 0
        self._pyformat = dialect.paramstyle == "format"

    def _sql(self, sql: str) -> str:
        # Our queries hold no literal '?' or '%': the translation is exact.
        return sql.replace("?", "%s") if self._pyformat else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the driver's cursor (fetchone, fetchall, rowcount)."""
        if self._probe:
            if self._probe == 2 or not sql.startswith("SELECT "):
                raise WriteNeeded(sql)
            self._probe = 2
        return self.conn.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self._probe:
            raise WriteNeeded(sql)
        if self._pyformat:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            self.conn.executemany(sql, rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row, or None."""
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(sql, params).fetchall())


class Dialect(Protocol):
    @property
    def paramstyle(self) -> str:
        """ "qmark" (sqlite3) or "format" (psycopg)."""
        ...

    @property
    def now(self) -> str:
        """SQL expression: the database's clock, as POSIX seconds."""
        ...

    @property
    def skip_locked(self) -> str:
        """Appended to the SELECT of a claim ("" where writes are serial)."""
        ...

    @property
    def notify(self) -> str:
        """A statement telling every instance that work was added ("" for none)."""
        ...


class Backend(Protocol):
    """What a database gives the engine."""

    @property
    def dialect(self) -> Dialect: ...

    def connect(self) -> Any:
        """Open (or take from a pool) the connection the engine thread uses."""
        ...

    def begin(self, conn: Any) -> None:
        """Start a write transaction (raise a driver error if it cannot now)."""
        ...

    def commit(self, conn: Any) -> None: ...

    def rollback(self, conn: Any) -> None: ...

    def in_transaction(self, conn: Any) -> bool: ...

    def unavailable(self, err: BaseException) -> str | None:
        """Why this error means the store cannot be used now (-> StoreUnavailable), or None."""
        ...

    def lost(self, conn: Any, err: BaseException) -> Any:
        """After `err`, the connection to use next (the same, or a new one)."""
        ...

    def close(self, conn: Any) -> None: ...


class _Op:
    """One store call waiting for the engine thread."""

    __slots__ = ("fn", "write", "read_first", "then", "future", "loop")

    def __init__(
        self,
        fn: Callable[[Tx], Any],
        write: bool,
        loop: asyncio.AbstractEventLoop,
        read_first: bool = False,
        then: Callable[[Tx, Any], Any] | None = None,
    ):
        self.fn = fn
        self.write = write
        self.read_first = read_first
        self.then = then
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(self.apply, result, error)

    def apply(self, result: Any, error: BaseException | None) -> None:
        """In the caller's loop: the call's result or error."""
        if self.future.done():  # the caller was cancelled
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


def _settle_all(settled: list[tuple[_Op, Any, BaseException | None]]) -> None:
    """Settle a transaction's calls with one wake-up per event loop, not one per
    call: each call_soon_threadsafe writes to the loop's self-pipe, a system
    call that often wakes another core (strace of both processes, 1 000 mails
    on 20 connections: 8.2 -> 6.7 sendto and 25 -> 21 futex calls per mail)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, Any, BaseException | None]]] = {}
    for item in settled:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_apply_all, items)


def _apply_all(items: list[tuple[_Op, Any, BaseException | None]]) -> None:
    for op, result, error in items:
        op.apply(result, error)


_STOP = object()


class Engine:
    """Runs store calls on one thread, batched into shared transactions."""

    def __init__(
        self, backend: Backend, name: str = "store", shard: str = "", commit_wait_s: float = 0.0
    ) -> None:
        self.backend = backend
        self.name = name
        self.shard = shard
        self.commit_wait_s = commit_wait_s  # see the module docstring
        self.commits = 0  # transactions committed (for the benchmark)
        self._last_commit = float("-inf")  # time.monotonic() of the last commit
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def start(self, conn: Any) -> None:
        """Start the thread on an open connection."""
        self._conn = conn
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._conn is not None:
            self.backend.close(self._conn)
            self._conn = None

    async def run(self, fn: Callable[[Tx], T], write: bool, read_first: bool = False) -> T:
        """Run `fn` in the engine thread (in the shared transaction when `write`);
        return once committed. `read_first`: try it outside the transaction first
        (module docstring). Driver errors that mean "not now" raise StoreUnavailable."""
        result: T = await self._submit(_Op(fn, write, asyncio.get_running_loop(), read_first))
        return result

    async def run_then(
        self, fn: Callable[[Tx], T], then: Callable[[Tx, T], U], read_first: bool = False
    ) -> tuple[T, U | None]:
        """run(fn, write=True), then `then(tx, result)` once it is committed,
        outside the transaction, on the same trip to the engine thread: a claim
        and the read of what it claimed cost one wake-up of each thread, not two.
        A `then` that fails gives None (the caller reads by itself): the
        write is committed and its result stands."""
        loop = asyncio.get_running_loop()
        result: tuple[T, U | None] = await self._submit(_Op(fn, True, loop, read_first, then))
        return result

    async def _submit(self, op: _Op) -> Any:
        if self._thread is None:
            raise StoreUnavailable("store is not open")
        self._queue.put(op)
        try:
            return await op.future
        except StoreUnavailable:
            raise
        except Exception as err:
            why = self.backend.unavailable(err)
            if why is not None:
                raise StoreUnavailable(why) from err
            raise

    # -- the thread --------------------------------------------------------

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            deadline = 0.0  # until when to wait for more calls: by default, not at all
            # A poll (read_first) mostly needs no transaction: it does not wait.
            if (
                self.commit_wait_s
                and isinstance(first, _Op)
                and first.write
                and not first.read_first
            ):
                now = time.monotonic()
                if now - self._last_commit < BUSY_S:
                    deadline = now + self.commit_wait_s
            while len(batch) < MAX_BATCH:
                try:
                    left = deadline - time.monotonic() if deadline else 0.0
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            ops = [op for op in batch if isinstance(op, _Op)]
            try:
                self._run_batch(ops)
            except BaseException as err:  # never let the thread die: answer and go on
                log.exception("store: batch failed")
                for op in ops:
                    op.settle(error=err)
            if stop:
                return

    def _fail(self, ops: Iterable[_Op], err: BaseException) -> None:
        for op in ops:
            op.settle(error=err)
        if self.backend.unavailable(err) is not None:
            self._conn = self.backend.lost(self._conn, err)

    def _answer_without_writing(self, batch: list[_Op]) -> list[_Op]:
        """Run each `read_first` call on a Tx that takes its first SELECT only;
        answer those that needed no more; return the rest (the transaction's)."""
        rest: list[_Op] = []
        answered: list[tuple[_Op, Any, BaseException | None]] = []
        for op in batch:
            if not op.read_first:  # (read_first calls are writes: SqlStore._poll)
                rest.append(op)
                continue
            try:
                tx = Tx(self._conn, self.backend.dialect, self.shard, first_select_only=True)
                answered.append((op, op.fn(tx), None))
            except Exception:  # WriteNeeded, or an error the transaction path reports
                rest.append(op)
        _settle_all(self._followed(answered))
        return rest

    def _run_batch(self, batch: list[_Op]) -> None:
        backend = self.backend
        if any(op.read_first for op in batch):
            batch = self._answer_without_writing(batch)
        tx = Tx(self._conn, backend.dialect, self.shard)
        if not any(op.write for op in batch):
            for op in batch:
                try:
                    op.settle(op.fn(tx))
                except BaseException as err:
                    self._fail([op], err)
                    tx = Tx(self._conn, backend.dialect, self.shard)
            return
        try:
            backend.begin(self._conn)
        except Exception as err:  # locked past the busy timeout, server gone...
            self._fail(batch, err)
            return
        conn = self._conn
        tx = Tx(conn, backend.dialect, self.shard)
        done: list[tuple[_Op, Any, BaseException | None]] = []
        # A lone call needs no savepoint: if it fails, the transaction is its
        # alone. (SQLite copies every page a savepoint's statements change into
        # a sub-journal: ~50 page writes to a temporary file per 500-number email.)
        alone = len(batch) == 1
        for i, op in enumerate(batch):
            try:
                if not alone:
                    conn.execute("SAVEPOINT op")
            except Exception as err:
                self._rollback(conn)
                self._fail([o for o, _, _ in done] + batch[i:], err)
                return
            try:
                result = op.fn(tx)
                if not alone:
                    conn.execute("RELEASE SAVEPOINT op")
                done.append((op, result, None))
            except BaseException as err:
                if (
                    alone
                    or not backend.in_transaction(conn)
                    or backend.unavailable(err) is not None
                ):
                    # The call's transaction is its alone, or the whole transaction
                    # is gone (SQLITE_FULL, IOERR; a lost PostgreSQL connection):
                    # nothing of this batch was kept.
                    self._rollback(conn)
                    self._fail([o for o, _, _ in done] + batch[i:], err)
                    return
                try:
                    conn.execute("ROLLBACK TO SAVEPOINT op")
                    conn.execute("RELEASE SAVEPOINT op")
                except Exception as rollback_err:
                    self._rollback(conn)
                    self._fail([o for o, _, _ in done] + batch[i:], rollback_err)
                    return
                done.append((op, None, err))
        try:
            backend.commit(conn)
            self.commits += 1
            self._last_commit = time.monotonic()
        except Exception as err:
            self._rollback(conn)
            self._fail([op for op, _, _ in done], err)
            return
        _settle_all(self._followed(done))

    def _followed(
        self, settled: list[tuple[_Op, Any, BaseException | None]]
    ) -> list[tuple[_Op, Any, BaseException | None]]:
        """The results of run_then's calls paired with their follow-up reads."""
        if not any(op.then is not None for op, _, _ in settled):
            return settled
        out: list[tuple[_Op, Any, BaseException | None]] = []
        for op, result, error in settled:
            if op.then is None or error is not None:
                out.append((op, result, error))
                continue
            try:
                after = op.then(Tx(self._conn, self.backend.dialect, self.shard), result)
            except Exception as err:  # the write stands; the caller reads by itself
                log.warning("store: the read after a write failed: %s", err)
                after = None
                if self.backend.unavailable(err) is not None:
                    self._conn = self.backend.lost(self._conn, err)
                else:
                    self._rollback(self._conn)
            out.append((op, (result, after), None))
        return out

    def _rollback(self, conn: Any) -> None:
        try:
            if self.backend.in_transaction(conn):
                self.backend.rollback(conn)
        except Exception as err:
            log.error("store: rollback failed: %s", err)
