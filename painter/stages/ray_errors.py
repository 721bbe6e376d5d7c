"""The one way to unwrap an error that crossed Ray: what a Ray task or actor raised, found from what reaches
the driver, so a job ends with its own one-line reason instead of Ray's stack trace.

- `painter_error_from(exc)`: the `PainterError` a task or actor raised, or None;
- `painter_errors(kind)`: a context in which such an error (of `kind`) comes out as itself, not wrapped;
- `one_line_reason(exc)`: any error in one line (the CLI's failure line).
Ray Data does not carry the exception object to the driver (a UDF's error arrives as a
`RayTaskError(UserCodeException)`, an actor constructor's as an `ActorDiedError`), only its traceback text,
so the reason is read from that text. Ray itself is never imported here: the CLI uses this module whether or
not a job started Ray.
"""
from __future__ import annotations

import contextlib
import re
import sys

from painter import errors

_RAISED = re.compile(r"^painter\.errors\.(\w+): (.+)$", re.MULTILINE)
_REASON = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _is_ray(exc: BaseException) -> bool:
    """A Ray error (Ray's `RayTaskError(X)` is also an instance of the X it wraps)."""
    ray = sys.modules.get("ray")
    return type(exc).__module__.split(".")[0] == "ray" or (ray is not None and isinstance(exc, ray.exceptions.RayError))


def _chain(exc: BaseException | None):
    """`exc` and its causes, Ray's `cause` attribute included, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def _text(exc: BaseException) -> str:
    return _ANSI.sub("", f"{exc}\n{getattr(exc, 'error_msg', '') or ''}").strip()


def painter_error_from(exc: BaseException) -> errors.PainterError | None:
    """The PainterError raised inside a Ray task or actor that caused `exc` (or `exc` itself), or None; one
    known only by its traceback text (`painter.errors.X: message`) is rebuilt as `X(message)`."""
    for e in _chain(exc):
        if isinstance(e, errors.PainterError) and not _is_ray(e):
            return e
        found = [(name, msg) for name, msg in _RAISED.findall(_text(e))
                 if isinstance(getattr(errors, name, None), type) and issubclass(getattr(errors, name), errors.PainterError)]
        if found:
            name, message = found[-1]
            return getattr(errors, name)(message.strip())
    return None


@contextlib.contextmanager
def painter_errors(kind: type[errors.PainterError] = errors.PainterError):
    """Within: an error whose cause is a `kind` raised in a Ray task or actor is raised as that error."""
    try:
        yield
    except Exception as e:
        cause = painter_error_from(e)
        if not isinstance(cause, kind):
            raise
        raise cause from None


def one_line_reason(error: BaseException) -> str:
    """The reason of an error in one line: a PainterError (raised here or inside Ray), else the deepest
    `SomeError: message` line of the error and its causes (Ray wraps a worker's or actor's error in its
    traceback text), else the error's first line."""
    cause = painter_error_from(error)
    if cause is not None:
        return str(cause)
    reason = None
    for e in _chain(error):
        text = _text(e)
        found = _REASON.findall(text)
        if found:
            reason = f"{found[-1][0]}: {found[-1][1].strip()}"
        elif text and not _is_ray(e):
            reason = f"{type(e).__name__}: {text.splitlines()[0]}"
    if reason:
        return reason
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
