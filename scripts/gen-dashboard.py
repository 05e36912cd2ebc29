#!/usr/bin/env python3
"""Writes deploy/grafana/fleet-dashboard.json (the fleet's Grafana dashboard).

The dashboard is generated so its panels stay uniform; edit this script and
rerun it rather than editing the JSON by hand. scripts/check-deploy.sh fails
when the committed JSON differs from what this script writes.
"""
import json
import pathlib
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'

PANELS = [
    ("Recommended vs live workers", "short", [
        (f"fleet_recommended_replicas{{{M}}}", "recommended {{model}}"),
        (f"fleet_model_workers{{{M}}}", "live {{model}}"),
        (f"fleet_desired_replicas{{{M}}}", "desired now {{model}}"),
    ]),
    ("Backlog by priority", "short", [
        (f"sum by (model, priority) (fleet_model_backlog{{{M}}})", "{{model}} {{priority}}"),
    ]),
    ("Arrivals vs completions", "reqps", [
        (f"fleet_model_arrival_rate{{{M}}}", "arrivals {{model}}"),
        (f"fleet_model_completion_rate{{{M}}}", "completions {{model}}"),
    ]),
    ("Time to drain / service rate per worker", "s", [
        (f"fleet_model_drain_seconds{{{M}}}", "drain {{model}}"),
        (f"fleet_model_service_rate{{{M}}}", "req/s per worker {{model}}"),
    ]),
    ("Latency p95: end to end, queue wait, compute", "s", [
        (f"fleet:request_duration_seconds:p95{{{M}}}", "end to end {{model}}"),
        (f"histogram_quantile(0.95, sum by (le, model) (rate(fleet_queue_wait_seconds_bucket{{{M}}}[5m])))",
         "queue wait {{model}}"),
        (f"histogram_quantile(0.95, sum by (le, model) (rate(fleet_compute_seconds_bucket{{{M}}}[5m])))",
         "compute {{model}}"),
    ]),
    ("Queue wait p95 by priority", "s", [
        (f"histogram_quantile(0.95, sum by (le, priority) (rate(fleet_queue_wait_seconds_bucket{{{M}}}[5m])))",
         "{{priority}}"),
    ]),
    ("HTTP requests by status", "reqps", [
        ("sum by (status) (rate(fleet_http_requests_total[5m]))", "{{status}}"),
    ]),
    ("Worker outcomes", "reqps", [
        (f"sum by (outcome) (rate(fleet_worker_requests_total{{{M}}}[5m]))", "{{outcome}}"),
    ]),
    ("Consumer lag", "short", [
        ("fleet_consumer_lag", "{{stream}}/{{consumer}}"),
        ("fleet_consumer_redelivered", "redelivered {{stream}}/{{consumer}}"),
    ]),
    ("Dead letters and redeliveries", "short", [
        (f"sum by (model, code) (increase(fleet_dead_letters_total{{{M}}}[15m]))", "DLQ {{model}} {{code}}"),
        (f"sum by (model) (increase(fleet_worker_naks_total{{{M}}}[15m]))", "naks {{model}}"),
        ('fleet_stream_messages{stream="FLEET_DLQ"}', "FLEET_DLQ size"),
    ]),
    ("Workers in flight", "short", [
        ("fleet_worker_inflight", "{{instance}}"),
        ("fleet_registry_workers", "workers in registry"),
    ]),
    ("Cache lookups by result", "reqps", [
        (f"sum by (result) (rate(fleet_cache_lookups_total{{{M}}}[5m]))", "{{result}}"),
        (f"sum by (result) (rate(fleet_ingress_cache_total{{{M}}}[5m]))", "ingress {{result}}"),
    ]),
    ("Cache bytes / open circuit breakers", "short", [
        ("sum by (tier) (fleet_cache_bytes)", "cache bytes {{tier}}"),
        (f"count by (model) (fleet_breaker_state{{{M}}} == 2)", "open breakers {{model}}"),
    ]),
    ("Scaler warnings and lag trend", "short", [
        (f"fleet_scaler_warning{{{M}}} > 0", "{{model}} {{kind}}"),
        (f"fleet_model_lag_slope{{{M}}}", "lag slope {{model}} (req/s)"),
    ]),
    ("Time to first token p95 / time per output token p50", "s", [
        (f"fleet:time_to_first_token_seconds:p95{{{M}}}", "first token p95 {{model}} {{priority}}"),
        (f"fleet:time_per_output_token_seconds:p50{{{M}}}", "per token p50 {{model}}"),
    ]),
    ("Tokens per second / oldest waiting request (s)", "short", [
        (f"fleet:generated_tokens_per_second:rate1m{{{M}}}", "tokens/s {{model}}"),
        (f"fleet_queue_oldest_wait_seconds{{{M}}}", "oldest wait {{model}} {{priority}}"),
    ]),
]


def dashboard():
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [
                {"refId": chr(ord("A") + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                for j, (expr, legend) in enumerate(targets)
            ],
        })
    return {
        "uid": "retro-fleet",
        "title": "retro-fleet",
        "tags": ["retro-fleet"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
            {"name": "model", "type": "query", "datasource": DS,
             "query": "label_values(fleet_model_backlog, model)", "includeAll": True, "multi": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).resolve().parent.parent / "deploy/grafana/fleet-dashboard.json"
    text = json.dumps(dashboard(), indent=2) + "\n"
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        if out.read_text() != text:
            sys.exit(f"{out} is not what scripts/gen-dashboard.py writes; rerun it")
    else:
        out.write_text(text)
