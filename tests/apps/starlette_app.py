"""A Starlette (ASGI) app for the trimrun_worker tests: `/` answers with the worker's pid,
`/slow?ms=N` sleeps first (a request in flight across a stop signal)."""

import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def index(request):
    return PlainTextResponse(f"starlette {os.getpid()}\n")


async def pid(request):
    return PlainTextResponse(f"{os.getpid()}")


async def slow(request):
    await asyncio.sleep(int(request.query_params.get("ms", "500")) / 1000)
    return PlainTextResponse(f"slow {os.getpid()}\n")


app = Starlette(routes=[Route("/", index), Route("/pid", pid), Route("/slow", slow)])
