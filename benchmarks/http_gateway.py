"""HTTP gateway benchmark: a trivial task's round trip through bluesky-httpserver, against the
same round trip straight over 0MQ to the same kernel, in one run.

Prints one JSON line:
- http_round_trip_ms: median time from function_execute until task_result reads completed,
  with bluesky_queueserver_api.http.REManagerAPI through bluesky-httpserver (uvicorn,
  loopback, API key)                                                         [target < 50 ms]
- zmq_round_trip_ms: the same with bluesky_queueserver_api.zmq.REManagerAPI
- ratio: http / zmq (what the gateway costs)
- status_http_ms / status_zmq_ms: median status() round trips
- gateway_start_s: seconds until bluesky-httpserver served

Usage: python benchmarks/http_gateway.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gateway import free_port, start_gateway  # noqa: E402
from kernel_utils import KernelSession  # noqa: E402

API_KEY = "qmagicBenchApiKey0123"


def round_trip(rm, poll: float) -> float:
    from bluesky_queueserver_api import BFunc

    t0 = time.perf_counter()
    uid = rm.function_execute(BFunc("noop"), run_in_background=True)["task_uid"]
    while rm.task_result(uid)["status"] != "completed":
        time.sleep(poll)  # the client's own polling, as an operator script does
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    opts = parser.parse_args()
    n = 20 if opts.quick else 100
    from bluesky_queueserver_api.http import REManagerAPI as HttpAPI
    from bluesky_queueserver_api.zmq import REManagerAPI as ZmqAPI

    with tempfile.TemporaryDirectory(prefix="qmagic-bench-http-") as tmp:
        base = Path(tmp)
        control, info = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        kernel = KernelSession(base / "kernel", argv=[
            "--ext=qmagic", f"--QMagic.zmq_control_address={control}",
            f"--QMagic.zmq_info_address={info}", "--QMagic.journal_enabled=False"]).start()
        gw = None
        try:
            kernel.execute("def noop():\n    return None\n", check=True)
            gw = start_gateway(control, info, API_KEY, base)
            http = HttpAPI(http_server_uri=gw.uri)
            http.set_authorization_key(api_key=API_KEY)
            zmq_rm = ZmqAPI(zmq_control_addr=control)
            http_times, zmq_times, http_status, zmq_status = [], [], [], []
            for _ in range(5):  # warm up both paths
                round_trip(http, 0.001)
                round_trip(zmq_rm, 0.001)
            for _ in range(n):  # alternate: drift hits both alike
                http_times.append(round_trip(http, 0.001))
                zmq_times.append(round_trip(zmq_rm, 0.001))
                t0 = time.perf_counter()
                http.status(reload=True)
                http_status.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                zmq_rm.status(reload=True)
                zmq_status.append(time.perf_counter() - t0)
            http.close()
            zmq_rm.close()
        finally:
            if gw is not None:
                gw.stop()
            kernel.shutdown()
    h, z = statistics.median(http_times), statistics.median(zmq_times)
    result = {
        "benchmark": "http_gateway",
        "rounds": n,
        "http_round_trip_ms": round(h * 1e3, 2),
        "zmq_round_trip_ms": round(z * 1e3, 2),
        "ratio": round(h / z, 2),
        "status_http_ms": round(statistics.median(http_status) * 1e3, 2),
        "status_zmq_ms": round(statistics.median(zmq_status) * 1e3, 2),
        "gateway_start_s": round(gw.start_seconds, 1) if gw else None,
        "http_round_trip_target_max_ms": 50,
        "queueserver_reference_ms": 500,
    }
    result["targets_met"] = result["http_round_trip_ms"] < 50
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    main()
