"""A Flask (WSGI) app for the trimrun_worker tests: `/` answers with the worker's pid,
`/slow?ms=N` sleeps first (a request in flight across a stop signal)."""

import os
import time

from flask import Flask, request

app = Flask(__name__)


@app.get("/")
def index():
    return f"flask {os.getpid()}\n"


@app.get("/pid")
def pid():
    return f"{os.getpid()}"


@app.get("/slow")
def slow():
    time.sleep(int(request.args.get("ms", "500")) / 1000)
    return f"slow {os.getpid()}\n"
