"""Links between tasks: `after=` (a task runs once each of its parents succeeded) and the
follow-ups a task's success enqueues (`parent_id`).

A task enqueued after others is stored `queued` with `waiting_on` counting its parents that
have not succeeded, and the claim (`CLAIMABLE_WHERE`) passes it over until that is 0. Each
pending link is a row of `task_dependency`, found by its parent: the parent's success counts
its dependants down (`release`), its failure or cancel ends them `cancelled`, and theirs in
turn (`cancel_dependants`). A parent with links has `has_dependants` set, so that an outcome
looks for dependants only when there may be some: the common outcome costs nothing more.

Why a dependant is never stranded, on PostgreSQL, when it is enqueued while its parent ends:
the enqueue locks the parents' rows (`FOR NO KEY UPDATE`, which an outcome's UPDATE of the
same row waits for, and which waits for it) before it reads their state and sets their flag.
Either the outcome's UPDATE comes first: the enqueue waits for its commit and reads the end
(a success is not waited on; a failure creates the task cancelled). Or the enqueue comes
first: the outcome's UPDATE waits for the enqueue's commit, then re-reads the row and
returns the flag set, and its next statement, under a new snapshot (READ COMMITTED), sees
the links the enqueue committed. On SQLite one writer at a time makes the same true.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.changes import notify, notify_changed
from store.errors import ParentNotSucceeded, UnknownParents
from store.models import TaskStatus, dependency_table, task_table

t = task_table
d = dependency_table

# Parents one task may name: a bound on the locks and rows one enqueue takes.
MAX_PARENTS = 100

# The columns a linked task may be stored with beyond a plain enqueue's.
LINK_COLUMNS = ("parent_id", "after", "waiting_on", "has_dependants", "finished_at", "last_error")


def _why(parent_id: str, status: TaskStatus | None) -> str | None:
    """The `last_error` of a task whose parent is in `status` (None: gone), or None when the
    parent may still succeed."""
    if status is None:
        return f"parent task {parent_id} does not exist"
    if status == TaskStatus.FAILED:
        return f"parent task {parent_id} failed"
    if status == TaskStatus.CANCELLED:
        return f"parent task {parent_id} was cancelled"
    return None


def lock_parents(conn: Connection, parent_ids: Iterable[str]) -> dict[str, TaskStatus]:
    """The state of each of these tasks that exists, read under a row lock held until the
    transaction ends (taken in id order, so two enqueues never wait on each other in a
    circle), and each one that may still succeed marked `has_dependants`."""
    ids = sorted(set(parent_ids))
    if not ids:
        return {}
    query = sa.select(t.c.id, t.c.status).where(t.c.id.in_(ids)).order_by(t.c.id)
    # FOR NO KEY UPDATE: the lock an outcome's UPDATE takes itself, so each waits for the
    # other. (FOR SHARE would do for the reading, but two enqueues holding it on one parent
    # would then deadlock on setting the flag.) SQLite holds its one write lock already.
    found = {
        task_id: TaskStatus(status)
        for task_id, status in conn.execute(query.with_for_update(key_share=True))
    }
    pending = [task_id for task_id, status in found.items() if status != TaskStatus.SUCCEEDED]
    if pending:
        conn.execute(
            sa.update(t)
            .where(t.c.id.in_(pending), t.c.has_dependants.is_(False))
            .values(has_dependants=True)
        )
    return found


def insert_linked(
    conn: Connection, rows: list[dict[str, Any]], *, missing_cancels: bool = False
) -> None:
    """Insert tasks (rows of `store.tasks`) that run after others or follow a parent, in the
    order given: each one waits on its parents that have not succeeded, or is stored
    `cancelled` at once when one of them failed or was cancelled. `after=` may name a task
    earlier in `rows` (a fan-in of follow-ups).

    A parent that does not exist raises `UnknownParents` (nothing is stored); with
    `missing_cancels` (follow-ups, written with their parent's success, which must not fail
    for them) the task is stored cancelled instead, its `last_error` naming the parent.
    """
    own = {row["id"]: row for row in rows}
    outside = {p for row in rows for p in row["after"] or () if p not in own}
    found = lock_parents(conn, outside)
    unknown = sorted(outside - set(found))
    if unknown and not missing_cancels:
        raise UnknownParents(unknown)
    links: list[dict[str, str]] = []
    for row in rows:
        now = row["created_at"]
        row.update(waiting_on=0, has_dependants=False, finished_at=None, last_error=None)
        pending: list[str] = []
        for parent_id in row["after"] or ():
            earlier = own.get(parent_id)
            if earlier is not None:
                earlier["has_dependants"] = True
            status = TaskStatus(earlier["status"]) if earlier is not None else found.get(parent_id)
            why = _why(parent_id, status)
            if why is not None:
                row.update(status=TaskStatus.CANCELLED, finished_at=now, last_error=why)
                pending = []
                break
            if status != TaskStatus.SUCCEEDED:
                pending.append(parent_id)
        row["waiting_on"] = len(pending)
        links += [{"child_id": row["id"], "parent_id": parent_id} for parent_id in pending]
    conn.execute(sa.insert(t), rows)
    if links:
        conn.execute(sa.insert(d), links)
    notify(
        conn,
        {
            row["queue"]
            for row in rows
            if row["status"] == TaskStatus.QUEUED
            and row["waiting_on"] == 0
            and row["scheduled_at"] <= row["created_at"]
        },
    )


def release(conn: Connection, parent_ids: Sequence[str], *, now: datetime) -> None:
    """These tasks succeeded (in this transaction): each task waiting on them waits on as
    many parents fewer, and runs once it waits on none. Their links are spent."""
    if not parent_ids:
        return
    ids = list(parent_ids)
    counted = (
        sa.select(sa.func.count())
        .where(d.c.child_id == t.c.id, d.c.parent_id.in_(ids))
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.update(t)
        .where(
            t.c.id.in_(sa.select(d.c.child_id).where(d.c.parent_id.in_(ids))),
            t.c.status == TaskStatus.QUEUED,
            t.c.waiting_on > 0,
        )
        .values(waiting_on=t.c.waiting_on - counted)
        .returning(t.c.id, t.c.queue, t.c.waiting_on, t.c.scheduled_at)
    ).all()
    conn.execute(sa.delete(d).where(d.c.parent_id.in_(ids)))
    if rows:
        notify_changed(conn, [row.id for row in rows])
        notify(conn, {row.queue for row in rows if row.waiting_on <= 0 and row.scheduled_at <= now})


def cancel_dependants(
    conn: Connection, ended: Mapping[str, TaskStatus], *, now: datetime
) -> list[str]:
    """These tasks failed or were cancelled (in this transaction): every task waiting on
    them ends `cancelled`, its `last_error` naming the parent, and so on down. Returns the
    ids of the tasks cancelled."""
    cancelled: list[str] = []
    while ended:
        pairs = conn.execute(
            sa.select(d.c.child_id, d.c.parent_id)
            .where(d.c.parent_id.in_(list(ended)))
            .order_by(d.c.child_id, d.c.parent_id)
        ).all()
        conn.execute(sa.delete(d).where(d.c.parent_id.in_(list(ended))))
        # One reason per child (its first ended parent), one statement per reason.
        children: dict[str, list[str]] = {}
        seen: set[str] = set()
        for child_id, parent_id in pairs:
            if child_id not in seen:
                seen.add(child_id)
                why = _why(parent_id, ended[parent_id]) or f"parent task {parent_id} ended"
                children.setdefault(why, []).append(child_id)
        following: dict[str, TaskStatus] = {}
        for why, child_ids in children.items():
            rows = conn.execute(
                sa.update(t)
                .where(t.c.id.in_(child_ids), t.c.status == TaskStatus.QUEUED)
                .values(status=TaskStatus.CANCELLED, finished_at=now, last_error=why, waiting_on=0)
                .returning(t.c.id, t.c.has_dependants)
            ).all()
            cancelled += [row.id for row in rows]
            following.update((row.id, TaskStatus.CANCELLED) for row in rows if row.has_dependants)
        ended = following
    if cancelled:
        notify_changed(conn, cancelled)
    return cancelled


def settle(conn: Connection, task_id: str, status: TaskStatus, *, now: datetime) -> None:
    """What a parent's end means for its dependants: released when it succeeded, cancelled
    when it failed or was cancelled. For a task with `has_dependants` set."""
    if status == TaskStatus.SUCCEEDED:
        release(conn, [task_id], now=now)
    elif status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        cancel_dependants(conn, {task_id: status}, now=now)


def relink(conn: Connection, task_id: str, after: Sequence[str]) -> int:
    """Before a retry of a task that runs after `after`: link it again to those parents that
    have not succeeded (a parent since pruned is not waited on); how many that is.
    `ParentNotSucceeded` when one of them failed or was cancelled: the task could only be
    cancelled again."""
    found = lock_parents(conn, after)
    for parent_id in after:
        status = found.get(parent_id)
        if status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            raise ParentNotSucceeded(task_id, parent_id, status.value)
    pending = [p for p in dict.fromkeys(after) if p in found and found[p] != TaskStatus.SUCCEEDED]
    conn.execute(sa.delete(d).where(d.c.child_id == task_id))
    if pending:
        conn.execute(sa.insert(d), [{"child_id": task_id, "parent_id": p} for p in pending])
    return len(pending)
