"""Prometheus families of a daemon's `metrics` reply (needs prometheus-client: the `prometheus`
extra). The daemon's own `/metrics` endpoint and the HTTP bridge both serve these, so an HPA or a
dashboard reads the same names from either: `qwen3vl_daemon_queue_depth` is what prometheus-adapter
scales on."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .protocol import MetricsReply


class DaemonSnapshot:
    """Prometheus families built from one `metrics` reply of the daemon."""

    def __init__(self, snapshot: MetricsReply):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        for name, doc, label in (("requests", "Requests received", "op"), ("errors", "Error replies", "code"),
                                 ("inputs", "Inputs of successful requests", "op"),
                                 ("tokens", "Tokens processed", "op")):
            family = CounterMetricFamily(f"qwen3vl_daemon_{name}", doc, labels=[label])
            for value, count in sorted(getattr(s, name).items()):
                family.add_metric([value], count)
            yield family
        yield GaugeMetricFamily("qwen3vl_daemon_queue_depth", "Inputs admitted and not yet answered (the "
                                "autoscaling metric)", value=s.queue_depth)
        yield GaugeMetricFamily("qwen3vl_daemon_queued_tokens", "Estimated tokens of the inputs admitted and not "
                                "yet answered", value=s.queued_tokens)
        if s.status:  # older daemons do not send it
            yield GaugeMetricFamily("qwen3vl_daemon_ready", "1 while the daemon is ready (models loaded and warm, "
                                    "not draining), as `health --ready` says", value=1.0 if s.status == "ready" else 0.0)
        for name in ("forward_s", "queue_wait_s"):
            yield CounterMetricFamily(f"qwen3vl_daemon_{name[:-2]}_seconds", f"Daemon {name[:-2]} time",
                                      value=getattr(s, name))
        latency = HistogramMetricFamily("qwen3vl_daemon_request_seconds", "Daemon request latency", labels=["op"])
        for op, hist in sorted(s.latency_s.items()):
            latency.add_metric([op], _buckets(hist), hist["sum"])
        yield latency
        batch = s.batch_size
        if batch:
            family = HistogramMetricFamily("qwen3vl_daemon_batch_size", "Inputs per forward pass")
            family.add_metric([], _buckets(batch), batch["sum"])
            yield family
        yield from _per_model(s.models)
        yield from _per_priority(s.priorities, s.preemptions)


# Per model (the daemon's name for it, `task:name`): what its forwards and its loads took.
MODEL_COUNTERS = (("batches", "qwen3vl_daemon_model_batches", "Forward passes"),
                  ("batched_inputs", "qwen3vl_daemon_model_inputs", "Inputs in forward passes"),
                  ("forward_s", "qwen3vl_daemon_model_forward_seconds", "Time in forward passes"),
                  ("loads", "qwen3vl_daemon_model_loads", "Times the model was loaded"),
                  ("unloads", "qwen3vl_daemon_model_unloads", "Times the model was unloaded"),
                  ("load_s", "qwen3vl_daemon_model_load_seconds", "Time loading the model"))
MODEL_STATES = ("unloaded", "loading", "loaded", "failed")


def _per_priority(priorities: dict, preemptions: int) -> Iterator:
    """Queued work and forwards by priority class (interactive, batch), and preemptions."""
    if not priorities:  # older daemons do not send them
        return
    for field, name, help, kind in (
            ("queued_inputs", "qwen3vl_daemon_priority_queue_depth", "Inputs admitted and not yet answered",
             GaugeMetricFamily),
            ("queued_tokens", "qwen3vl_daemon_priority_queued_tokens", "Their estimated tokens", GaugeMetricFamily),
            ("batches", "qwen3vl_daemon_priority_batches", "Forward passes", CounterMetricFamily),
            ("forward_s", "qwen3vl_daemon_priority_forward_seconds", "Time in forward passes (a paused batch "
             "forward's without the interactive forwards run inside it)", CounterMetricFamily)):
        family = kind(name, f"{help}, by priority", labels=["priority"])
        for priority, values in sorted(priorities.items()):
            family.add_metric([priority], float(values.get(field, 0)))
        yield family
    yield CounterMetricFamily("qwen3vl_daemon_preemptions", "Batch-priority forwards paused to run interactive work",
                              value=preemptions)


def _per_model(models: dict) -> Iterator:
    if not models:
        return
    for field, name, help in MODEL_COUNTERS:
        family = CounterMetricFamily(name, help, labels=["model"])
        for model, values in sorted(models.items()):
            family.add_metric([model], float(values.get(field, 0)))
        yield family
    states = GaugeMetricFamily("qwen3vl_daemon_model_state", "1 for the model's state", labels=["model", "state"])
    ready = GaugeMetricFamily("qwen3vl_daemon_model_ready", "1 while the model is loaded (it answers without a "
                              "load first)", labels=["model"])
    for model, values in sorted(models.items()):
        for state in MODEL_STATES:
            states.add_metric([model, state], 1.0 if values.get("state") == state else 0.0)
        ready.add_metric([model], 1.0 if values.get("state") == "loaded" else 0.0)
    yield states
    yield ready


def _buckets(hist: dict) -> list[tuple[str, float]]:
    bounds = [str(float(b)) for b in hist["buckets"]] + ["+Inf"]
    return list(zip(bounds, hist["counts"]))
