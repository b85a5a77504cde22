"""trimrun_worker: serve a WSGI or ASGI app as one trimrun worker.

    trimrun -n 8 --limit 512M --bind :8000 --ready notify -- python -m trimrun_worker myapp:app

One process per worker, no master of its own: the app is served on the listening sockets
trimrun passes at fd 3.. (``LISTEN_FDS``), by waitress (WSGI) or uvicorn (ASGI). The worker
says ``READY=1`` on ``NOTIFY_SOCKET`` once the app is imported and the server accepts, and on
the stop signal (SIGTERM, or SIGINT) it stops accepting, closes idle keep-alive
connections, finishes the requests in flight within ``--graceful-timeout``, and exits 0.

With ``TRIMRUN_ZYGOTE_FD`` set (``trimrun --preload``) the process is a zygote instead: it
imports the app once and forks workers on request (see ``zygote.py`` and docs/preload.md).
"""

__version__ = "0.1.0"
