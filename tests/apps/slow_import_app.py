"""A WSGI app whose import takes SLOW_IMPORT_SECONDS (default 3) while the file named by
SLOW_IMPORT_FLAG exists, as an app with a heavy import does. `/` answers with the pid.
For the tests of what the pool does while a zygote (`--preload`) imports it."""

import os
import time

_flag = os.environ.get("SLOW_IMPORT_FLAG")
if _flag and os.path.exists(_flag):
    time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", "3")))


def app(environ, start_response):
    data = f"{os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(data)))])
    return [data]
