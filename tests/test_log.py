"""The broker's throttle for warnings a local peer can provoke at will."""

from __future__ import annotations

import logging

from supervisor import log


def test_throttled_warnings_keep_a_burst_then_count_what_they_dropped(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: clock[0])
    log.logger.propagate = True
    try:
        throttle = log.Throttled(burst=3, window=10.0)
        with caplog.at_level(logging.WARNING, logger="hermes.gateway"):
            for _ in range(50):
                throttle.warning("dropped bad frame")
            assert len(caplog.records) == 3
            assert throttle.suppressed == 47
            clock[0] += 10.0
            throttle.warning("dropped bad frame")
        assert len(caplog.records) == 4
        assert caplog.records[-1].fields["suppressed_since_last"] == 47
        assert throttle.suppressed == 0
    finally:
        log.logger.propagate = False
