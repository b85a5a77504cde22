"""A busy multi-threaded Python server for the trim soak test.

    python3 soak.py CHURN_THREADS

Serves line-delimited JSON on 127.0.0.1 (port printed as "port N"): for each request
{"id": I, "values": [...], "pad": "..."} it answers {"id": I, "sum": S, "pad": "..."}.
CHURN_THREADS threads keep allocating and freeing malloc-sized objects meanwhile.
"""

import json
import random
import socketserver
import sys
import threading


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            req = json.loads(line)
            resp = {"id": req["id"], "sum": sum(req["values"]), "pad": req["pad"]}
            self.wfile.write(json.dumps(resp).encode() + b"\n")
            self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def churn(seed):
    r = random.Random(seed)
    live = []
    while True:
        for _ in range(200):
            live.append(bytes(r.randint(600, 20000)))
        r.shuffle(live)
        del live[: len(live) // 2 if len(live) > 4000 else 50]
        # Park now and then, like a worker waiting on I/O.
        threading.Event().wait(0.001)


def main():
    for i in range(int(sys.argv[1])):
        threading.Thread(target=churn, args=(i,), daemon=True).start()
    srv = Server(("127.0.0.1", 0), Handler)
    print("port", srv.server_address[1], flush=True)
    srv.serve_forever()


main()
