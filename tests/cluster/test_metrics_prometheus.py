"""Metrics against a real Prometheus: two replicas of a small random model behind the live app
(autoscaled on KV pressure between 2 and 2, so that the autoscaler's series exist too),
Debian's ``prometheus`` scraping the app's ``/metrics`` every second, and every PromQL
expression of every dashboard in ``dashboards/`` evaluated through Prometheus's HTTP API.

The KV budget is small (64 pages = 512 tokens per replica), so a burst of six 200-token requests
preempts: however the router splits them, one replica runs at least three (600 tokens). The last
tests kill the metrics hub (the ingress and the replicas must find a new one), then delete the app
(the hub must go with it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster.app import build_app
from cluster.metrics.catalogue import METRICS
from cluster.metrics_hub import find_hub
from tests.cluster.conftest import BASE_URL, HTTP_PORT
from tests.cluster.helpers import replica_stats, router_decisions
from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
PROMETHEUS = shutil.which("prometheus")
DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "dashboards").glob("*.json"))
API_KEY = "metrics-test-key"
PAGE = 32 * 1024  # 16 tokens per page and range; K and V ranges: 8 tokens per physical page
BUDGET_PAGES = 64  # 512 tokens per replica
#: What the test puts for Grafana's built-in variables (windows wide enough for the whole run).
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "10m",
    "__range_s": "600",
    "datasource": "prometheus",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("metrics-model"),
        0,
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        max_position_embeddings=1024,
    )


@pytest.fixture(scope="module")
def app(ray_session: None, model_dir: Path) -> Iterator[str]:
    """The app with an API key (/metrics must not need it); yields the served model name."""
    serve.run(
        build_app(
            {
                "model": str(model_dir),
                "min_replicas": 2,
                "max_replicas": 2,
                "autoscaling_metrics_interval_s": 0.5,
                "max_model_len": 512,
                "max_running": 8,
                "kv_cache_bytes": BUDGET_PAGES * PAGE,
                "page_size": PAGE,
                "routing_stats_period_s": 0.2,
                "metrics_period_s": 0.5,
                "replica_cpus": 1,
                "api_key": API_KEY,
            }
        ),
        name="metrics",
        route_prefix="/",
    )
    try:
        yield model_dir.name
    finally:
        serve.delete("metrics")


class Prometheus:
    """A Prometheus server on loopback scraping the app; ``query`` runs instant PromQL queries."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = root / "prometheus.yml"
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "global": {
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "evaluation_interval": "1s",
                    },
                    "scrape_configs": [
                        {
                            "job_name": "vattn",
                            "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{HTTP_PORT}"]}],
                        }
                    ],
                }
            )
        )
        self.log = (root / "prometheus.log").open("w")
        assert PROMETHEUS is not None
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: self._ready(), 30, "prometheus did not become ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited with {self.process.returncode}"
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def values(self, expr: str, label: str = "replica") -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def label_values(self, label: str, match: str) -> list[str]:
        body = httpx.get(
            f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=10
        ).json()
        assert body["status"] == "success", body
        return body["data"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip(
            "the prometheus binary is not installed (apt-get install prometheus; .ci/run does)"
        )
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    try:
        yield server
    finally:
        server.stop()


def complete(prompt: list[int], max_tokens: int, stream: bool = False) -> tuple[int, str | None]:
    """Completion tokens received, and the replica that served it (None when streamed)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"authorization": f"Bearer {API_KEY}"}
    if not stream:
        response = httpx.post(f"{BASE_URL}/v1/completions", json=body, headers=headers, timeout=180)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["completion_tokens"], response.headers["x-vattn-replica"]
    usage = None
    with httpx.stream(
        "POST", f"{BASE_URL}/v1/completions", json=body, headers=headers, timeout=180
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None
    return usage["completion_tokens"], None


@pytest.fixture(scope="module")
def traffic(prometheus: Prometheus, app: str) -> dict[str, Any]:
    """Warm-up, a preempting burst (streamed and not) and a quiet end; what the test saw."""
    received: list[int] = []

    def ranked_warm_up() -> bool:
        """A short request, ranked by free pages? (It is once the router holds both replicas'
        stats; until then it falls back to power of two choices.)"""
        received.append(complete([5, 6, 7], 4)[0])
        return router_decisions(app).get("most_free_pages", 0) >= 1

    wait_until(ranked_warm_up, 30, "a request ranked on both replicas' routing stats")
    warm_ups = len(received)
    selector = f'model="{app}"'
    # A scrape taken while a warm-up still held a page would not be the idle value: wait for one
    # that saw both replicas idle, as the test waits after the burst.
    wait_until(
        lambda: (
            list(prometheus.values(f"vattn_kv_pages_in_use{{{selector}}}").values()) == [0.0, 0.0]
        ),
        30,
        "prometheus never saw both replicas' KV pages idle",
    )
    before = prometheus.values(f"vattn_kv_pages_available{{{selector}}}")
    results: list[tuple[int, str | None]] = []
    jobs = [([10 + i] * 40, 160, False) for i in range(6)] + [
        ([30, 31, 32, 33], 24, True) for _ in range(2)
    ]
    threads = [
        threading.Thread(target=lambda job=job: results.append(complete(*job))) for job in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received += [tokens for tokens, _ in results]
    received.append(complete([40, 41], 8, stream=True)[0])
    assert len(received) == warm_ups + len(jobs) + 1
    whole: dict[str, int] = {}  # non-streamed replies carry their replica
    for tokens, replica in results:
        if replica is not None:
            whole[replica] = whole.get(replica, 0) + tokens
    return {
        "model": app,
        "selector": selector,
        "before": before,
        "received": sum(received),
        "whole": whole,
    }


# ---- every dashboard query returns data ------------------------------------------------------
def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    out = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels += panel.get("panels", [])
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr")]
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def variable_values(dashboard: dict[str, Any], prometheus: Prometheus) -> dict[str, str]:
    """Grafana's built-ins, and each query variable evaluated like Grafana does (all values, as a
    regex alternation), in the order they are defined (later ones may use earlier ones)."""
    values = dict(BUILTINS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(query, values))
        assert match, (
            f"variable {variable['name']}: only label_values(metric, label) is supported: {query}"
        )
        found = prometheus.label_values(match.group(2), match.group(1))
        assert found, f"variable {variable['name']} ({query}) has no values"
        values[variable["name"]] = "(" + "|".join(promql_regex_escape(v) for v in found) + ")"
    return values


def promql_regex_escape(value: str) -> str:
    """Grafana's escaping of a multi-value variable inside a PromQL regex string (doubled
    backslashes: one for the string literal, one for the regex)."""
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value.replace("\\", "\\" * 4))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_returns_data(
    traffic: dict[str, Any], prometheus: Prometheus, path: Path
) -> None:
    wait_until(
        lambda: (
            prometheus.values(f"sum(vattn_generation_tokens_total{{{traffic['selector']}}})").get(
                ""
            )
            == traffic["received"]
        ),
        30,
        "prometheus never scraped the final token counts",
    )
    dashboard = json.loads(path.read_text())
    values = variable_values(dashboard, prometheus)
    exprs = dashboard_exprs(dashboard)
    assert exprs, f"{path.name} has no queries"
    empty = []
    for title, expr in exprs:
        result = prometheus.query(substitute(expr, values))
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite:
            empty.append(f"{title}: {expr} -> {result}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


# ---- values agree with the engines -----------------------------------------------------------
def engine_stats(app_name: str = "metrics") -> dict[str, dict[str, Any]]:
    """Each replica's own ``stats_dict``."""
    return replica_stats(app_name, 2)


def test_token_and_preemption_counters_equal_the_engines_and_what_the_client_received(
    traffic: dict[str, Any], prometheus: Prometheus
) -> None:
    selector = traffic["selector"]
    wait_until(
        lambda: (
            prometheus.values(f"sum(vattn_generation_tokens_total{{{selector}}})").get("")
            == traffic["received"]
        ),
        30,
        "scraped generation tokens never matched the tokens received",
    )
    engines = engine_stats()
    scraped = prometheus.values(f"vattn_generation_tokens_total{{{selector}}}")
    assert scraped == {r: float(s["generation_tokens_total"]) for r, s in engines.items()}
    assert sum(scraped.values()) == traffic["received"]
    assert all(scraped[replica] >= tokens for replica, tokens in traffic["whole"].items())
    preemptions = prometheus.values(f"vattn_preemptions_total{{{selector}}}")
    assert preemptions == {r: float(s["preemptions_total"]) for r, s in engines.items()}
    assert sum(preemptions.values()) >= 1, "the burst should have preempted"
    prompt = prometheus.values(f"vattn_prompt_tokens_total{{{selector}}}")
    assert prompt == {r: float(s["prompt_tokens_total"]) for r, s in engines.items()}


def test_pages_return_to_their_pre_burst_value_and_match_the_books(
    traffic: dict[str, Any], prometheus: Prometheus
) -> None:
    selector = traffic["selector"]
    wait_until(
        lambda: set(prometheus.values(f"vattn_kv_pages_in_use{{{selector}}}").values()) == {0.0},
        30,
        "pages in use never went back to 0",
    )
    assert prometheus.values(f"vattn_kv_pages_available{{{selector}}}") == traffic["before"]
    assert set(traffic["before"].values()) == {float(BUDGET_PAGES)}
    assert set(prometheus.values(f"vattn_kv_pages_budget{{{selector}}}").values()) == {
        float(BUDGET_PAGES)
    }
    assert set(prometheus.values(f"vattn_kv_page_size_bytes{{{selector}}}").values()) == {
        float(PAGE)
    }
    created = prometheus.values(f"vattn_kv_pages_created{{{selector}}}")
    parts = prometheus.values(
        f"vattn_kv_pages_free{{{selector}}} + vattn_kv_pages_in_use{{{selector}}}"
        f" + vattn_kv_pages_cached{{{selector}}}"
    )
    assert parts == created and max(created.values()) > 0
    engines = engine_stats()
    assert created == {r: float(s["kv"]["pages_created"]) for r, s in engines.items()}
    assert prometheus.values(f"vattn_kv_map_calls_total{{{selector}}}") == {
        r: float(s["kv"]["map_calls"]) for r, s in engines.items()
    }
    map_count = prometheus.values(f"vattn_kv_map_latency_seconds_count{{{selector}}}")
    assert map_count == {r: float(s["kv"]["map_calls"]) for r, s in engines.items()}
    assert set(prometheus.values(f"vattn_kv_pages_budget{{{selector}}}", "rank")) == {"0"}


def test_router_decisions_and_the_endpoint(traffic: dict[str, Any], prometheus: Prometheus) -> None:
    model = traffic["model"]
    reasons = prometheus.values(f'vattn_router_decisions_total{{model="{model}"}}', "reason")
    assert set(reasons) == {"most_free_pages", "fallback"} and reasons["most_free_pages"] >= 1
    routed = prometheus.values(f'vattn_router_requests_total{{model="{model}"}}')
    assert set(routed) <= set(engine_stats()) and sum(routed.values()) == reasons["most_free_pages"]
    response = httpx.get(f"{BASE_URL}/metrics", timeout=10)  # no API key
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = set(re.findall(r"^# TYPE (\S+) (\S+)$", response.text, re.MULTILINE))
    assert families == {
        (m.name, m.kind) for m in METRICS
    }  # text format 0.0.4: counters' full names
    targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"][
        "activeTargets"
    ]
    assert [t["health"] for t in targets] == ["up"]


def test_the_autoscaler_reports_its_replicas_input_and_decisions(
    traffic: dict[str, Any], prometheus: Prometheus
) -> None:
    selector = traffic["selector"]
    for name in ("current", "target", "desired"):
        wait_until(
            lambda name=name: (
                prometheus.values(f"vattn_autoscaler_{name}_replicas{{{selector}}}", "model")
                == {traffic["model"]: 2.0}
            ),
            30,
            f"vattn_autoscaler_{name}_replicas at 2",
        )
    budget = prometheus.values(f"vattn_autoscaler_kv_budget_pages{{{selector}}}", "model")
    assert budget == {traffic["model"]: float(BUDGET_PAGES)}
    reasons = prometheus.values(f"vattn_autoscaler_decisions_total{{{selector}}}", "reason")
    # Bounded at 2 both ways: whatever the load asked for, the decision is held at the bounds.
    assert reasons and set(reasons) <= {"at_min", "at_max", "steady", "no_metrics"}, reasons
    assert sum(reasons.values()) >= 1


# ---- the hub's lifetime (keep these last: they kill the hub, then delete the app) -------------
def test_a_killed_hub_is_replaced_and_the_replicas_find_the_new_one(app: str) -> None:
    wait_until(lambda: scrape_replicas(app) == 2, 30, "the replicas never reached the hub")
    hub = find_hub()
    assert hub is not None
    ray.kill(hub)
    wait_until(lambda: scrape_replicas(app) == 2, 30, "the replicas never reached a new hub")
    assert find_hub() is not None


def test_the_hub_goes_with_the_app(app: str) -> None:
    assert find_hub() is not None
    serve.delete("metrics")
    wait_until(lambda: find_hub() is None, 30, "the hub outlived its app")


def scrape_replicas(model: str) -> int:
    """Replicas with KV series on /metrics now (the ingress recreates a dead hub on a scrape)."""
    text = httpx.get(f"{BASE_URL}/metrics", timeout=10).text
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "vattn_kv_pages_budget"
    ]
    return len({s.labels["replica"] for s in family.samples if s.labels["model"] == model})
