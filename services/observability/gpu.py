"""GPU readings through NVML (nvidia-ml-py): utilisation, memory and power per device, keyed by UUID.

`read_gpus()` returns an empty list, without raising, where there is no NVIDIA driver or GPU (CPU
hosts, tests), so callers never special-case machines without GPUs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)
_init_lock = threading.Lock()
_nvml_state: bool | None = None  # None: not tried; False: no NVML here


@dataclass(frozen=True, slots=True)
class GpuReading:
    uuid: str
    index: int
    name: str
    utilization: float  # 0..1, the share of the last sample period a kernel ran
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None  # None where the board does not report power


def _nvml():
    global _nvml_state
    with _init_lock:
        if _nvml_state is False:
            return None
        try:
            import pynvml

            if _nvml_state is None:
                pynvml.nvmlInit()
                _nvml_state = True
            return pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            log.debug("no NVML here (%s); GPU metrics are off", exc)
            _nvml_state = False
            return None


def read_gpus() -> list[GpuReading]:
    nvml = _nvml()
    if nvml is None:
        return []
    readings = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
            except nvml.NVMLError:
                power = None
            readings.append(GpuReading(
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)), index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
                utilization=nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                memory_used_bytes=int(memory.used), memory_total_bytes=int(memory.total), power_watts=power))
    except Exception:  # a device vanishing mid-read must not take the replica down
        log.warning("reading GPU metrics failed", exc_info=True)
    return readings


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
