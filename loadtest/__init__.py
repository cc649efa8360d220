"""Streaming load tester for the LiveStream gRPC API (`liveserve loadtest`).

config (LoadConfig) -> workload (frames, query arrivals) -> session (one stream's driver) -> runner
(levels, sweeps) -> metrics (LevelReport, RunReport) -> report (JSON, HTML, PNG, text summary).
"""

from liveserve.loadtest.config import ConfigError, LoadConfig

__all__ = ["ConfigError", "LoadConfig"]
