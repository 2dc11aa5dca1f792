"""Tests for bench B: the class marker sends them to queue_b (worker-b in the demo)."""

import os

import pytest


@pytest.mark.queue("queue_b")
class TestBenchB:
    def test_runs_where_bench_b_is(self, dispatch_context):
        if dispatch_context.dispatched:
            assert dispatch_context.queue == "queue_b"
            assert os.environ["WORKER_ID"] == dispatch_context.worker
        else:
            assert dispatch_context.worker == "local"

    @pytest.mark.parametrize("channel", [1, 2, 3])
    def test_adc_channel_in_range(self, channel):
        reading = 512 + channel * 10  # a stand-in for reading the instrument
        assert 0 <= reading < 1024

    def test_serial_banner(self, capsys):
        print("bench B: U-Boot 2024.01 ready")
        assert "U-Boot" in capsys.readouterr().out
