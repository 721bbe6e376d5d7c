"""The one way to unwrap a Ray error: the `PainterError` a Ray task or actor raised, found from what reaches
the driver, so a job ends with its one-line reason instead of Ray's stack trace."""
from __future__ import annotations
import re
import ray
from painter import errors


_RAISED = re.compile(r"^painter\.errors\.(\w+): (.+)$", re.MULTILINE)


def painter_error_from(exc: BaseException) -> errors.PainterError | None:
    """The PainterError raised inside a Ray task or actor that caused `exc`, or None.

    Ray Data 2.60 does not carry the exception object to the driver (a UDF's error arrives as a
    `RayTaskError(UserCodeException)`, an actor constructor's as an `ActorDiedError`), only its
    traceback text; the last `painter.errors.X: message` line of that text is rebuilt as `X(message)`.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, errors.PainterError) and not isinstance(exc, ray.exceptions.RayError):
            return exc
        text = f"{exc}\n{getattr(exc, 'error_msg', '')}"
        found = [(name, msg) for name, msg in _RAISED.findall(text)
                 if isinstance(getattr(errors, name, None), type) and issubclass(getattr(errors, name), errors.PainterError)]
        if found:
            name, message = found[-1]
            return getattr(errors, name)(message.strip())
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


