"""Import the app (``module:attribute``) and tell WSGI from ASGI."""

import importlib
import inspect
import sys


class AppError(Exception):
    pass


def load(spec, factory=False, app_dir="."):
    """Import ``module:attr`` (``attr`` may be dotted); ``module`` alone looks for ``app``
    then ``application``. With ``factory``, call the attribute with no arguments."""
    if app_dir is not None and app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise AppError(f"invalid app {spec!r}: expected MODULE:ATTRIBUTE, as myapp:app")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise AppError(f"cannot import {module_name!r}: {e} (run from the app's "
                           f"directory, or pass --app-dir)") from e
        raise
    names = [attr] if attr else ["app", "application"]
    for name in names:
        obj = module
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if factory:
            obj = obj()
        if obj is None:
            raise AppError(f"{module_name}:{name} is None")
        return obj
    raise AppError(f"module {module_name!r} has no attribute {' or '.join(names)!r}")


def detect_interface(app):
    """'asgi' for an ``async def`` callable (function or ``__call__``), else 'wsgi'."""
    if inspect.iscoroutinefunction(app):
        return "asgi"
    call = getattr(type(app), "__call__", None)
    if call is not None and inspect.iscoroutinefunction(call):
        return "asgi"
    return "wsgi"
