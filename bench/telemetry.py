"""The GPU's state through NVML (``nvidia-ml-py``, imported as ``pynvml``), so a throttled run is visible.

``snapshot()`` reads the GPU's name, driver, SM and memory clocks, power draw, temperature, memory in
use and the reasons NVML gives for the current clocks (power cap, thermal slowdown...).  Without NVML
(the package missing, no driver, no GPU) it returns ``{"nvml": "<why there is none>"}`` and never
raises: telemetry must not cost a benchmark run.  A query one GPU does not support is left out.
"""

from __future__ import annotations

from typing import Callable

# NVML's clock event reasons (nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*): bit -> name.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}
# Reasons that mean the clocks were held down while working (idle and the settings are not).
THROTTLING = ("sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reasons(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


def _queries(nvml, handle) -> dict[str, Callable[[], object]]:
    reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return {
        "gpu": lambda: _text(nvml.nvmlDeviceGetName(handle)),
        "driver": lambda: _text(nvml.nvmlSystemGetDriverVersion()),
        "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
        "power_w": lambda: round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, 1),
        "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        "memory_used_mib": lambda: round(nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20),
        "memory_total_mib": lambda: round(nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20),
        "clock_event_reasons": lambda: _reasons(int(reasons(handle))),
    }


def snapshot(index: int = 0) -> dict:
    """The state of GPU ``index`` now, or ``{"nvml": reason}`` when NVML cannot say."""
    try:
        import pynvml as nvml
    except ImportError:
        return {"nvml": "unavailable: nvidia-ml-py (pynvml) is not installed"}
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError (no driver, no GPU) or a broken install
        return {"nvml": f"unavailable: {type(e).__name__}: {e}"}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        state = {}
        for name, query in _queries(nvml, handle).items():
            try:
                state[name] = query()
            except Exception:  # not supported on this GPU / driver: leave it out
                continue
        return state
    except Exception as e:
        return {"nvml": f"unavailable: {type(e).__name__}: {e}"}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def describe(state: dict) -> str:
    """One line: the GPU and driver, or why NVML says nothing."""
    if "nvml" in state:
        return f"NVML {state['nvml']}"
    return f"{state.get('gpu', '?')}, driver {state.get('driver', '?')}"


def line(state: dict) -> str:
    """One line of the state: clocks, power, temperature, memory, reasons for the clocks."""
    if "nvml" in state:
        return f"NVML {state['nvml']}"
    parts = [f"SM {state.get('sm_clock_mhz', '?')} MHz", f"memory {state.get('mem_clock_mhz', '?')} MHz",
             f"{state.get('power_w', '?')} W", f"{state.get('temperature_c', '?')} C",
             f"{state.get('memory_used_mib', '?')} MiB used"]
    reasons = state.get("clock_event_reasons") or []
    throttled = [r for r in reasons if r in THROTTLING]
    parts.append(f"THROTTLED ({', '.join(throttled)})" if throttled else
                 f"clocks: {', '.join(reasons) if reasons else 'no event'}")
    return ", ".join(parts)


def table_lines(records: list[dict]) -> list[str]:
    """Markdown lines for the telemetry records of a run (op, part, when + a snapshot each)."""
    if records and all("nvml" in r for r in records):
        return [f"- NVML {records[0]['nvml']} (no GPU state recorded)"]
    header = "| op | part | when | SM MHz | mem MHz | W | C | MiB used | clock events |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        if "nvml" in r:
            lines.append(f"| {r.get('op')} | {r.get('part')} | {r.get('when')} | NVML {r['nvml']} | | | | | |")
            continue
        reasons = ", ".join(r.get("clock_event_reasons") or []) or "none"
        lines.append(f"| {r.get('op')} | {r.get('part')} | {r.get('when')} | {r.get('sm_clock_mhz', '')} | "
                     f"{r.get('mem_clock_mhz', '')} | {r.get('power_w', '')} | {r.get('temperature_c', '')} | "
                     f"{r.get('memory_used_mib', '')} | {reasons} |")
    return lines
