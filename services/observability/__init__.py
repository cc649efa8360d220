"""Metrics (Prometheus through Ray or prometheus_client), OpenTelemetry traces, NVML GPU readings."""
