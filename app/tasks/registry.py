"""The `@task` decorator and the registry that maps task names to functions and policies."""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from app.errors import (
    InvalidArguments,
    NotATask,
    TaskDefinitionError,
    TaskSwitchedOff,
    UnknownTask,
    UnreadableArguments,
)
from app.tasks.context import Grant, TaskContext
from app.tasks.recurrence import MAX_PERIODIC_NAME, Recurrence
from app.tasks.retry import DEFAULT_POLICY, RetryPolicy
from store import jsonvalues

F = TypeVar("F", bound=Callable[..., Any])

_SPEC_ATTRIBUTE = "__backstop_task__"
_P = inspect.Parameter


@dataclass(frozen=True)
class _Param:
    name: str
    kind: inspect._ParameterKind
    adapter: TypeAdapter[Any]


def _problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{first['msg']}" + (f" (at {where})" if where else "")


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its function, defaults and retry policy, and its argument checks."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    queue: str
    priority: int
    timeout: float | None
    policy: RetryPolicy
    context_param: str | None
    signature: inspect.Signature
    params: dict[str, _Param] = field(repr=False)
    # Set for a periodic task (`cron=` or `every=`): when the runners enqueue it.
    recurrence: Recurrence | None = None
    # The configuration its context carries beyond the plain settings (`TaskContext.grant`).
    grants: tuple[type[Grant], ...] = ()

    @property
    def max_attempts(self) -> int:
        return self.policy.max_attempts

    def _target(self, position: int | str) -> _Param:
        """The parameter a positional index or a keyword lands on (the bind already passed)."""
        params = list(self.params.values())
        if isinstance(position, int):
            positional = [
                p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
            ]
            if position < len(positional):
                return positional[position]
            return next(p for p in params if p.kind is _P.VAR_POSITIONAL)
        named = self.params.get(position)
        if named is not None and named.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY):
            return named
        return next(p for p in params if p.kind is _P.VAR_KEYWORD)

    def _dump(self, position: int | str, value: Any) -> Any:
        param = self._target(position)
        # A keyword is named as the caller wrote it: it may land on the `**kwargs` parameter.
        label = position if isinstance(position, str) else param.name
        # Checked before pydantic recurses through it, and again as it dumps: the JSON dump
        # would turn a NaN or an infinity inside an `Any` into null, the plain one shows it.
        found = jsonvalues.problem(value)
        try:
            if found is None:
                checked = param.adapter.validate_python(value)
                found = jsonvalues.problem(param.adapter.dump_python(checked))
            if found is None:
                dumped = param.adapter.dump_python(checked, mode="json")
                json.dumps(dumped, allow_nan=False)
        except ValidationError as exc:
            raise InvalidArguments(self.name, f"argument {label!r}: {_problem(exc)}") from exc
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            raise InvalidArguments(
                self.name,
                f"argument {label!r} is not JSON-serialisable ({type(value).__name__})",
            ) from exc
        if found is not None:
            raise InvalidArguments(self.name, f"argument {label!r} holds {found}")
        return dumped

    def check(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Arguments checked against the signature and types, as the JSON the row will hold."""
        if self.context_param is not None and self.context_param in kwargs:
            raise InvalidArguments(
                self.name, f"{self.context_param!r} is the task's context, filled in by the runner"
            )
        keys = jsonvalues.problem(dict.fromkeys(kwargs))
        if keys is not None:
            raise InvalidArguments(self.name, f"keyword arguments hold {keys}")
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(self.name, str(exc)) from exc
        return (
            [self._dump(i, value) for i, value in enumerate(args)],
            {key: self._dump(key, value) for key, value in kwargs.items()},
        )

    def load(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The stored JSON arguments turned back into the types the function declares."""
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise UnreadableArguments(
                self.name,
                "the stored arguments are not a JSON array and an object"
                f" ({type(args).__name__} and {type(kwargs).__name__})",
            )
        return (
            [self._target(i).adapter.validate_python(value) for i, value in enumerate(args)],
            {key: self._target(key).adapter.validate_python(v) for key, v in kwargs.items()},
        )


def _params(
    fn: Callable[..., Any], name: str
) -> tuple[inspect.Signature, str | None, dict[str, _Param]]:
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    context_param = None
    kept: list[inspect.Parameter] = []
    params: dict[str, _Param] = {}
    for param in signature.parameters.values():
        annotation = hints.get(param.name, Any)
        if annotation is TaskContext:
            if param.kind not in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY):
                raise TaskDefinitionError(
                    f"task {name!r}: {param.name} must be passable by keyword"
                )
            context_param = param.name
            continue
        if context_param is not None and param.kind in (
            _P.POSITIONAL_OR_KEYWORD,
            _P.VAR_POSITIONAL,
        ):
            # The runner passes the context by keyword: a positional parameter after it
            # could only be filled by position through the context's own slot.
            raise TaskDefinitionError(
                f"task {name!r}: put the TaskContext parameter {context_param!r} after "
                f"{param.name!r} (last, or keyword-only after *)"
            )
        kept.append(param)
        # For *args and **kwargs the annotation is that of each element, as Python reads it.
        params[param.name] = _Param(param.name, param.kind, TypeAdapter(annotation))
    return signature.replace(parameters=kept), context_param, params


class Registry:
    """Task names to their specs. `@task` fills the process-wide `registry`."""

    def __init__(self) -> None:
        self._specs: dict[str, TaskSpec] = {}
        self._off: frozenset[str] = frozenset()

    def without(self, names: Iterable[str]) -> Registry:
        """This registry with `names` switched off (unknown to it), as a view: a task
        registered here later is known to the view as well."""
        view = Registry()
        view._specs = self._specs
        view._off = self._off | frozenset(names)
        return view

    def add(self, spec: TaskSpec) -> None:
        """Register `spec`; a name already taken by another function is an error."""
        existing = self._specs.get(spec.name)
        if existing is not None and _origin(existing.fn) != _origin(spec.fn):
            raise TaskDefinitionError(
                f"task name {spec.name!r} is taken by {_origin(existing.fn)}; "
                f"pick another for {_origin(spec.fn)}"
            )
        self._specs[spec.name] = spec

    def get(self, name: str) -> TaskSpec:
        """The spec registered under `name`, or `UnknownTask` listing the known ones
        (`TaskSwitchedOff` when it is registered but switched off)."""
        if name in self._off:
            raise TaskSwitchedOff(name, self.names())
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownTask(name, self.names()) from None

    def resolve(self, fn_or_name: Callable[..., Any] | str) -> TaskSpec:
        """The spec of a decorated function or of a registered name."""
        if isinstance(fn_or_name, str):
            return self.get(fn_or_name)
        spec = getattr(fn_or_name, _SPEC_ATTRIBUTE, None)
        if not isinstance(spec, TaskSpec):
            raise NotATask(fn_or_name)
        if spec.name in self._off:
            raise TaskSwitchedOff(spec.name, self.names())
        return spec

    def names(self) -> list[str]:
        """Every registered name that is not switched off, sorted."""
        return sorted(name for name in self._specs if name not in self._off)

    def __contains__(self, name: object) -> bool:
        return name in self._specs and name not in self._off

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter([spec for name, spec in self._specs.items() if name not in self._off])


def _origin(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


registry = Registry()


def task(
    name: str | None = None,
    *,
    max_attempts: int = DEFAULT_POLICY.max_attempts,
    timeout: float | None = None,
    queue: str = "default",
    priority: int = 0,
    retry: retry_base | None = None,
    wait: wait_base | None = None,
    stop: stop_base | None = None,
    cron: str | None = None,
    every: float | timedelta | None = None,
    grants: Iterable[type[Grant]] = (),
) -> Callable[[F], F]:
    """Register a function as a durable task; the function itself is returned unchanged.

    `retry`, `wait` and `stop` are tenacity strategies (`retry_if_exception_type(...)`,
    `wait_exponential(...)`, `stop_after_delay(...)`); they are evaluated once per failed
    attempt to decide the next run time, which is stored on the task's row.

    `cron` (five crontab fields, in UTC) or `every` (seconds or a timedelta) makes it a
    periodic task: the runners enqueue it once per tick, however many of them run.

    `grants` names configuration the task needs beyond `ctx.settings` (a class with a
    `from_settings(settings)` constructor, like the built-in `SmtpServer`): the runner
    builds each from the settings and hands it to this task's context alone.
    """
    if max_attempts < 1:
        raise TaskDefinitionError("max_attempts must be at least 1")
    if timeout is not None and timeout <= 0:
        raise TaskDefinitionError("timeout must be positive")

    def decorate(fn: F) -> F:
        task_name = name or _origin(fn)
        signature, context_param, params = _params(fn, task_name)
        recurrence = _recurrence(task_name, signature, cron, every)
        policy = RetryPolicy(
            max_attempts=max_attempts,
            retry=retry or DEFAULT_POLICY.retry,
            wait=wait or DEFAULT_POLICY.wait,
            stop=stop,
        )
        spec = TaskSpec(
            name=task_name,
            fn=fn,
            is_async=inspect.iscoroutinefunction(fn),
            queue=queue,
            priority=priority,
            timeout=timeout,
            policy=policy,
            context_param=context_param,
            signature=signature,
            params=params,
            recurrence=recurrence,
            grants=tuple(grants),
        )
        registry.add(spec)
        setattr(fn, _SPEC_ATTRIBUTE, spec)
        return fn

    return decorate


def _recurrence(
    name: str, signature: inspect.Signature, cron: str | None, every: float | timedelta | None
) -> Recurrence | None:
    """The schedule `cron=` or `every=` asks for, checked: a periodic task is called bare."""
    try:
        recurrence = Recurrence.of(cron, every)
    except ValueError as exc:
        raise TaskDefinitionError(f"task {name!r}: {exc}") from None
    if recurrence is None:
        return None
    required = [
        param.name
        for param in signature.parameters.values()
        if param.default is _P.empty and param.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
    ]
    if required:
        raise TaskDefinitionError(
            f"task {name!r}: a periodic task is called without arguments, "
            f"but it requires {', '.join(required)}"
        )
    if len(name) > MAX_PERIODIC_NAME:
        raise TaskDefinitionError(
            f"task {name!r}: a periodic task's name is at most {MAX_PERIODIC_NAME} characters"
        )
    return recurrence
