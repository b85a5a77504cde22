"""Unit checks of the harness's own arithmetic (no servers): python bench/test_harness.py"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadgen  # noqa: E402
import run  # noqa: E402
import workload  # noqa: E402


def test_no_gap_when_pool_is_full():
    lt = {1: [0, 10], 2: [0, 10]}
    g = run.service_gaps(lt, {}, 2, 1, 9, tick=0.0)
    assert g == {"out_any_s": 0.0, "out_2plus_s": 0.0, "episodes_2plus": 0, "max_out": 0}, g


def test_one_restart_is_one_worker_out_until_the_replacement_loaded():
    lt = {1: [0, 3], 2: [0, 10], 3: [3.2, 10]}
    g = run.service_gaps(lt, {3: 4.0}, 2, 1, 9, tick=0.0)
    assert g["out_any_s"] == 1.0 and g["out_2plus_s"] == 0.0 and g["max_out"] == 1, g


def test_overlapping_restarts_count_as_two_out():
    lt = {1: [0, 3], 2: [0, 3.5], 3: [3.1, 10], 4: [3.6, 10]}
    g = run.service_gaps(lt, {3: 4.0, 4: 5.0}, 2, 1, 9, tick=0.0)
    assert g["out_2plus_s"] == 0.5 and g["episodes_2plus"] == 1 and g["max_out"] == 2, g
    assert g["out_any_s"] == 2.0, g


def test_surge_replacement_first_is_never_out():
    lt = {1: [0, 5], 2: [0, 10], 3: [4, 10]}
    g = run.service_gaps(lt, {3: 4.5}, 2, 1, 9, tick=0.0)
    assert g["out_any_s"] == 0.0, g


def test_workload_is_log_uniform_and_reproducible():
    a = workload.sizes(5000)
    assert a == workload.sizes(5000)
    sizes = sorted(s for s, _ in a)
    assert sizes[0] >= 1024 and sizes[-1] <= 1024 * 1024
    median = sizes[len(sizes) // 2]
    assert 20_000 < median < 50_000, median   # geometric mean of 1 KB and 1 MB is 32 KB


def test_percentile():
    v = sorted(range(1, 101))
    assert loadgen.percentile(v, 50) in (50, 51) and loadgen.percentile(v, 99) == 99


if __name__ == "__main__":
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_")]
    failed = 0
    for name, f in tests:
        try:
            f()
        except AssertionError as e:
            failed += 1
            print(f"FAIL {name}: {e}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
