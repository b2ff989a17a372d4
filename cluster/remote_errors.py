"""Errors raised in a Ray actor reach the ingress wrapped in Ray's own exception (its message is the
remote traceback). Both front doors map the actor's *own* exception to a status, so both unwrap
it here first."""


def unwrap(err: BaseException) -> BaseException:
    """The innermost non-Ray cause of `err` (or `err` itself). Ray is imported only for Ray's errors."""
    if not type(err).__module__.startswith("ray."):
        return err
    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    return err
