"""Unit tests of trimrun_worker's watchdog keep-alives: ``python3 -m unittest discover
python/tests`` (tests/watchdog.rs runs them)."""

import os
import unittest

from trimrun_worker.sdnotify import Watchdog, watchdog_interval


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)
        return True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class WatchdogTest(unittest.TestCase):
    def test_interval_is_a_quarter_of_watchdog_usec_for_this_process_only(self):
        pid = os.getpid()
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "2000000"}), 0.5)
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}), 7.5)
        # sd_watchdog_enabled(3): another process's watchdog, or none at all.
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}))
        for bad in ({}, {"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "0"},
                    {"WATCHDOG_USEC": "-5"}, {"WATCHDOG_USEC": "soon"}):
            self.assertIsNone(watchdog_interval(bad), bad)

    def test_keepalives_every_interval_while_the_loop_turns(self):
        rec, clock = Recorder(), Clock()
        wd = Watchdog(interval=1.0, notifier=rec, clock=clock)
        sent = 0
        for _ in range(100):  # 10 s of a loop turning every 0.1 s
            sent += wd.tick()
            clock.now += 0.1
        self.assertIn(sent, (10, 11))
        self.assertEqual(set(rec.sent), {"WATCHDOG=1"})

    def test_silent_while_every_thread_is_busy_and_none_finishes(self):
        rec, clock = Recorder(), Clock()
        wd = Watchdog(interval=1.0, notifier=rec, clock=clock)
        self.assertTrue(wd.tick(busy=False, progress=5))
        # All threads busy, requests finishing: keep-alives go on.
        for done in range(6, 16):
            clock.now += 1.0
            self.assertTrue(wd.tick(busy=True, progress=done))
        # All threads busy and no request finishing: silence, however long.
        for _ in range(50):
            clock.now += 0.2
            self.assertFalse(wd.tick(busy=True, progress=15))
        # One finishes (or a thread frees up): at once.
        self.assertTrue(wd.tick(busy=True, progress=16))
        clock.now += 1.0
        self.assertFalse(wd.tick(busy=True, progress=16))
        self.assertTrue(wd.tick(busy=False, progress=16))

    def test_no_watchdog_no_keepalive(self):
        rec = Recorder()
        wd = Watchdog(interval=None, notifier=rec)
        wd.interval = None
        self.assertFalse(wd.enabled)
        self.assertFalse(wd.tick())
        self.assertEqual(rec.sent, [])


if __name__ == "__main__":
    unittest.main()
