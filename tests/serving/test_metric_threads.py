"""The python backend's Metric is not thread-safe (a call from a second thread while one is in flight crashed
tritonserver): every metric `Families` makes serialises its calls, across metrics and families of the process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from nirvana.serving.metrics import Families


class _Probe:
    """Counts how many metric calls of the process are inside the backend at once."""

    def __init__(self) -> None:
        self.inside, self.most, self.total = 0, 0, 0.0
        self._lock = threading.Lock()

    def call(self, value: float) -> None:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.0005)  # the GIL is released while the server reads the message
        with self._lock:
            self.inside -= 1
            self.total += value


def _fake_pb(probe: _Probe) -> type:
    class ProbeMetric:
        def __init__(self, labels, **kwargs) -> None:
            pass

        increment = set = observe = staticmethod(probe.call)

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind) -> None:
            pass

        Metric = ProbeMetric

    class Pb:
        pass

    Pb.MetricFamily = MetricFamily
    return Pb


def test_metric_calls_from_many_threads_never_overlap() -> None:
    probe = _Probe()
    pb = _fake_pb(probe)
    first, second = Families(pb), Families(pb)
    counter, gauge = first.counter("a_total", "a"), second.gauge("b", "b")
    labelled = first.labelled_gauges("c", "c", "requests")

    def work(i: int) -> None:
        for _ in range(25):
            counter.increment(1)
            gauge.set(2)
            labelled(str(i % 3)).set(0)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert probe.most == 1
    assert probe.total == 8 * 25 * (1 + 2)
