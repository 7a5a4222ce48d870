"""Observability: the PrometheusRule, the Grafana dashboard and the metrics they rely on.

- rules: `promtool check rules` and `promtool test rules` (tests/ops/promtool/*_test.yaml) on the
  PrometheusRule's spec.groups; every alert is unit-tested firing and not firing; every alert
  has severity, summary, description and a runbook_url whose anchor exists in the docs; the
  object validates against the prometheus-operator CRD schema.
- dashboard: valid Grafana JSON wired to the `$datasource` variable, with units, thresholds and
  `$__rate_interval`; every query parses (promtool check rules on them as recording rules); the
  kustomization ships it as the `kvstore-dashboard` ConfigMap for the Grafana sidecar.
- live: every metric name the dashboard and rules use exists in a real scrape of the service,
  which `promtool check metrics` finds clean; and a real Prometheus scraping two replicas (with
  the rules loaded) through hits, misses, writes, 4xx and a stopped database returns data for
  every dashboard query and evaluates every rule without error.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests
import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE / "promtool"))
import extract_rules  # noqa: E402  (tests/ops/promtool/extract_rules.py)

DASHBOARD = REPO / "dashboards" / "kvstore.json"
RULE_FILE = extract_rules.PROMETHEUS_RULE
DOCS = REPO / "README.md"
RUNBOOK_BASE = "https://github.com/kvstore/kvstore/blob/main/README.md#"

# What the Grafana variables stand for when a query is checked or sent to Prometheus.
# $__rate_interval is what Grafana computes for a 15 s scrape interval (4 x 15 s); the live test
# scrapes every second, so a minute covers the whole run. "All" of $namespace/$pod is ".*".
LIVE_NAMESPACE = "kvstore-e2e"
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "namespace": LIVE_NAMESPACE,
    "job": "kvstore",
    "pod": ".*",
}

# The contract's metric catalogue: name -> (type, labels).
CATALOGUE = {
    "kvstore_build_info": ("gauge", {"version", "revision"}),
    "kvstore_http_requests_total": ("counter", {"method", "route", "status_class"}),
    "kvstore_http_request_duration_seconds": ("histogram", {"method", "route", "status_class"}),
    "kvstore_http_requests_in_flight": ("gauge", set()),
    "kvstore_http_connections_open": ("gauge", {"listener"}),
    "kvstore_http_connections_max": ("gauge", {"listener"}),
    "kvstore_cache_hits_total": ("counter", set()),
    "kvstore_cache_misses_total": ("counter", set()),
    "kvstore_cache_entries": ("gauge", set()),
    "kvstore_cache_size_bytes": ("gauge", set()),
    "kvstore_cache_capacity_bytes": ("gauge", set()),
    "kvstore_cache_evictions_total": ("counter", {"cause"}),
    "kvstore_cache_invalidations_total": ("counter", set()),
    "kvstore_db_query_duration_seconds": ("histogram", {"operation"}),
    "kvstore_db_errors_total": ("counter", {"operation"}),
    "kvstore_db_pool_connections_in_use": ("gauge", set()),
    "kvstore_db_pool_connections_max": ("gauge", set()),
    "kvstore_db_pool_waiting": ("gauge", set()),
    "kvstore_db_up": ("gauge", set()),
    "kvstore_ready": ("gauge", set()),
    "kvstore_writes_total": ("counter", {"operation"}),
    "kvstore_expired_purged_total": ("counter", set()),
    "process_cpu_seconds_total": ("counter", set()),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_start_time_seconds": ("gauge", set()),
    "process_open_fds": ("gauge", set()),
}
BOUNDED_LABELS = {
    "route": {"/v1/keys/{key}", "/v1/keys", "/v1/stats", "/", "/healthz", "/readyz",
              "/openapi.json", "unmatched"},
    "status_class": {"1xx", "2xx", "3xx", "4xx", "5xx"},
    "method": {"GET", "HEAD", "PUT", "POST", "DELETE", "OTHER"},
    "operation": {"get", "list", "upsert", "delete", "stats", "ping", "purge", "poll", "migrate"},
    "cause": {"size", "expired"},
    "listener": {"api", "metrics"},
}


def exempt_reason(name: str) -> str | None:
    """Why a metric name used by the dashboard or rules need not be in the service's /metrics."""
    if name == "up":
        return "`up` is written by Prometheus for every scrape target, not exposed by a target"
    if name.startswith("kube_"):
        return "kube_* series come from kube-state-metrics, not from kvstore"
    if name == "ALERTS":
        return "ALERTS is written by Prometheus' rule manager"
    return None


# ----------------------------------------------------------------------------- helpers

def tool(name: str, install: str) -> str:
    exe = shutil.which(name)
    if not exe:
        pytest.fail(f"{name} not found: {install}", pytrace=False)
    return exe


def promtool() -> str:
    return tool("promtool", "install Prometheus (apt-get install -y --no-install-recommends prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def query_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p.get("type") != "row"]


def panel_queries(dash: dict) -> list[tuple[str, str]]:
    """(label, expr) for every target of every panel."""
    out = []
    for p in query_panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} ref {t.get('refId')}", t["expr"]))
    return out


def annotation_queries(dash: dict) -> list[tuple[str, str]]:
    return [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if a.get("expr")]


def substitute(expr: str) -> str:
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise KeyError(name)
        return VARIABLES[name]
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)
    assert "$" not in out, out
    return out


def rule_list() -> list[dict]:
    return [r for g in extract_rules.groups() for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rule_list() if "alert" in r]


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names a PromQL expression selects."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        if m.group(2) or m.group(1).lower() in _KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def parse_exposition(text: str) -> tuple[dict, dict, list[tuple[str, dict]]]:
    """(TYPE by family, HELP by family, [(sample name, labels)]) of a Prometheus text scrape."""
    types, helps, samples = {}, {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ.strip()
        elif line.startswith("# HELP "):
            parts = line.split(" ", 3)
            helps[parts[2]] = parts[3] if len(parts) > 3 else ""
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert m, f"unparsable sample line: {line!r}"
            labels = dict(re.findall(r'(\w+)="((?:\\.|[^"\\])*)"', m.group(2) or ""))
            samples.append((m.group(1), labels))
    return types, helps, samples


# ----------------------------------------------------------------------------- rules

def test_rules_pass_promtool_check_and_unit_tests(tmp_path):
    """(a) promtool check rules + promtool test rules on the PrometheusRule's spec.groups."""
    promtool()
    assert extract_rules.unit_test_files(), "no tests/ops/promtool/*_test.yaml"
    check, test = extract_rules.run_promtool(tmp_path)
    assert check.returncode == 0, f"promtool check rules:\n{check.stdout}{check.stderr}"
    assert "SUCCESS" in check.stdout
    assert test.returncode == 0, f"promtool test rules:\n{test.stdout}{test.stderr}"


def test_every_alert_is_unit_tested_firing_and_not_firing():
    fired, quiet = set(), set()
    for f in extract_rules.unit_test_files():
        doc = yaml.safe_load(f.read_text())
        assert doc["rule_files"] == [extract_rules.RULES_NAME], f
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), f"alerts never tested firing: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts never tested not firing: {sorted(names - quiet)}"
    assert (fired | quiet) - names == set(), f"tests for unknown alerts: {sorted((fired | quiet) - names)}"


def test_alerts_have_severity_summary_description_and_a_runbook_in_the_docs():
    docs = DOCS.read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{2,4} (.+)$", docs, flags=re.M)}
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    expected = {"KvstoreErrorBudgetBurnFast", "KvstoreErrorBudgetBurnSlow", "KvstoreLatencyBudgetBurnFast",
                "KvstoreLatencyBudgetBurnSlow", "KvstoreDatabaseUnreachable", "KvstoreDbPoolSaturated",
                "KvstoreCacheHitRatioCollapsed", "KvstorePodRestarting", "KvstoreDown"}
    assert expected <= set(names), sorted(expected - set(names))
    for a in alerts():
        name = a["alert"]
        assert a["labels"]["severity"] in {"critical", "warning"}, name
        ann = a["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        url = ann["runbook_url"]
        assert url == RUNBOOK_BASE + "runbook-" + name.lower(), (name, url)
        assert url.split("#", 1)[1] in anchors, f"{DOCS.name} has no heading '### Runbook: {name}'"
    for r in rule_list():
        if "record" in r:
            assert re.fullmatch(r"kvstore:[a-z_]+:[a-z0-9_]+", r["record"]), r["record"]


def test_slo_alerts_use_the_workbook_windows_and_burn_rates():
    by_name = {a["alert"]: a["expr"] for a in alerts()}
    for slo, budget in (("ErrorBudget", "0.0001"), ("LatencyBudget", "0.01")):
        fast, slow = by_name[f"Kvstore{slo}BurnFast"], by_name[f"Kvstore{slo}BurnSlow"]
        for factor, windows in (("14.4", ("1h", "5m")), ("6", ("6h", "30m"))):
            for w in windows:
                assert re.search(rf"ratio_rate{w} > \({factor} \* {budget}\)", fast), (slo, factor, w)
        for factor, windows in (("3", ("1d", "2h")), ("1", ("3d", "6h"))):
            for w in windows:
                assert re.search(rf"ratio_rate{w} > \({factor} \* {budget}\)", slow), (slo, factor, w)


def test_prometheusrule_matches_the_operator_crd_schema():
    node = tool("node", "install Node.js and `npm install` in tests/ops")
    if not (HERE / "node_modules" / "@kubernetes-models" / "prometheus-operator").is_dir():
        pytest.fail("tests/ops/node_modules lacks @kubernetes-models/prometheus-operator: "
                    "run `npm install` in tests/ops", pytrace=False)
    script = """
import fs from "fs";
import YAML from "yaml";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
new PrometheusRule(YAML.parse(fs.readFileSync(process.argv[1], "utf8"))).validate();
console.log("valid");
"""
    res = subprocess.run([node, "--input-type=module", "-e", script, str(RULE_FILE)], cwd=HERE,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "valid" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- dashboard

def test_dashboard_is_wired_to_the_datasource_variable_with_units_and_thresholds():
    """(b) JSON sanity: $datasource, every panel uses it, units, thresholds, $__rate_interval."""
    assert DASHBOARD.stat().st_size < 256 * 1024, "too big for kubectl apply's last-applied annotation"
    dash = load_dashboard()
    assert dash["title"] and dash["uid"] and 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    ds_refs = {"${datasource}", "$datasource"}
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] in ds_refs, v["name"]
    for a in dash["annotations"]["list"]:
        if a.get("expr"):
            assert a["datasource"]["uid"] in ds_refs, a["name"]

    panels = query_panels(dash)
    assert len(panels) >= 20
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rows = [p["title"] for p in all_panels(dash) if p["type"] == "row"]
    for topic in ("Traffic", "Errors", "Latency", "Cache", "Database", "Writes", "Instances"):
        assert any(r.startswith(topic) for r in rows), f"no {topic} row"

    cells = set()
    for p in all_panels(dash):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for dx in range(g["w"]):
            for dy in range(g["h"]):
                cell = (g["x"] + dx, g["y"] + dy)
                assert cell not in cells, f"panel {p['title']!r} overlaps another"
                cells.add(cell)

    used_vars = set()
    for p in panels:
        where = f"panel {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p.get("description"), f"{where} has no description"
        defaults = p["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{where} has no unit"
        assert defaults.get("thresholds", {}).get("steps"), f"{where} has no thresholds"
        assert p["targets"], f"{where} has no queries"
        for t in p["targets"]:
            assert t["datasource"]["uid"] in ds_refs, where
            assert t["expr"].strip(), where
            for rng in re.findall(r"\[([^\]]*)\]", t["expr"]):
                assert rng == "$__rate_interval", f"{where}: range [{rng}] instead of [$__rate_interval]"
            used_vars |= set(re.findall(r"\$\{?(\w+)", t["expr"]))
    assert any(p["type"] == "stat" for p in panels) and any(p["type"] == "timeseries" for p in panels)
    assert used_vars - {"__rate_interval"} <= set(variables), used_vars - set(variables)
    assert {"namespace", "job", "pod"} <= used_vars


def test_dashboard_queries_parse_as_promql(tmp_path):
    """(b) every panel and annotation query, variables substituted, passes promtool check rules."""
    dash = load_dashboard()
    queries = panel_queries(dash) + annotation_queries(dash)
    rules = [{"record": f"dashboard:query_{i}:check", "expr": substitute(expr),
              "labels": {"origin": label[:60]}} for i, (label, expr) in enumerate(queries)]
    f = tmp_path / "dashboard.rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(rules)} rules found" in res.stdout


def test_dashboard_and_rules_reference_only_known_recording_rules():
    recorded = {r["record"] for r in rule_list() if "record" in r}
    used = set()
    for _, expr in panel_queries(load_dashboard()) + [("", r["expr"]) for r in rule_list()]:
        used |= {n for n in metric_names(expr) if ":" in n}
    assert used, "expected the dashboard to show the SLO recording rules"
    assert used <= recorded, f"unknown recording rules: {sorted(used - recorded)}"


def test_dashboard_configmap_for_the_grafana_sidecar():
    kubectl = tool("kubectl", "install kubectl (it bundles kustomize)")
    res = subprocess.run([kubectl, "kustomize", str(REPO / "dashboards")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert len(docs) == 1
    cm = docs[0]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "kvstore-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kvstore.json"]) == load_dashboard()


# ----------------------------------------------------------------------------- live service

def kv_url(base: str, key: str) -> str:
    return f"{base}/v1/keys/{urllib.parse.quote(key, safe='/')}"


def wait_ready(kv, timeout: float = 20) -> None:
    """Wait for /readyz 200 (start-up migrations done), as Kubernetes would before sending traffic."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{kv.http}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError("kvstore not ready in time:\n" + "\n".join(kv.logs()[-20:]))


def drive_traffic(http: str, tag: str, rounds: int = 1) -> None:
    """Cache hits and misses, writes (PUT, POST, DELETE), listing, stats and 4xx."""
    s = requests.Session()
    big = "x" * 10000  # under the per-entry cap (KV_CACHE_MAX_BYTES / 8), 16 of them overflow the budget
    for r in range(rounds):
        for i in range(8):
            res = s.put(kv_url(http, f"{tag}/k{i}"), json={"value": {"n": i, "round": r}}, timeout=10)
            assert res.status_code in (200, 201), res.text
        res = s.post(f"{http}/v1/keys", json={"key": f"{tag}/posted", "value": r, "ttl_seconds": 1}, timeout=10)
        assert res.status_code in (200, 201), res.text
        for _ in range(3):
            for i in range(8):
                assert s.get(kv_url(http, f"{tag}/k{i}"), timeout=10).status_code == 200
        for i in range(4):
            res = s.get(kv_url(http, f"{tag}/k{i}"), headers={"Cache-Control": "no-cache"}, timeout=10)
            assert res.status_code == 200
        for i in range(4):  # new keys: misses, then 404s answered from the negative cache
            assert s.get(kv_url(http, f"{tag}/missing-{r}-{i}"), timeout=10).status_code == 404
            assert s.get(kv_url(http, f"{tag}/missing-{r}-{i}"), timeout=10).status_code == 404
        for i in range(16):  # together bigger than the cache budget: size evictions
            res = s.put(kv_url(http, f"{tag}/big{i}"), json={"value": big}, timeout=10)
            assert res.status_code in (200, 201), res.text
            assert s.get(kv_url(http, f"{tag}/big{i}"), timeout=10).status_code == 200
        assert s.get(f"{http}/v1/keys/%01bad", timeout=10).status_code == 400
        assert s.get(kv_url(http, "k" * 600), timeout=10).status_code == 400
        assert s.put(kv_url(http, f"{tag}/k0"), data=b"{not json", timeout=10).status_code == 400
        assert s.get(f"{http}/v1/keys", params={"prefix": tag, "limit": 5}, timeout=10).status_code == 200
        assert s.get(f"{http}/v1/stats", timeout=10).status_code == 200
        assert s.delete(kv_url(http, f"{tag}/k7"), timeout=10).status_code == 204
        assert s.get(f"{http}/healthz", timeout=10).status_code == 200
        assert s.get(f"{http}/nowhere", timeout=10).status_code == 404


KV_ENV = {
    "KV_CACHE_MAX_BYTES": "131072",  # small, so the big values evict by size
    "KV_CACHE_TTL": "5s",
    "KV_CACHE_NEGATIVE_TTL": "2s",
    "KV_PURGE_INTERVAL": "1s",
    "KV_DB_QUERY_TIMEOUT": "1s",
    "KV_DB_ACQUIRE_TIMEOUT": "1s",
    "KV_DB_CONNECT_TIMEOUT": "1s",
    "KV_SHUTDOWN_DELAY": "0s",
    "KV_SHUTDOWN_TIMEOUT": "2s",
    "KV_ACCESS_LOG": "false",
}


def test_metrics_used_by_dashboard_and_rules_exist_and_scrape_is_clean(start_kvstore, fresh_database_url, tmp_path):
    """(c) every metric name the dashboard and rules use is in /metrics; (d) promtool check metrics."""
    kv = start_kvstore({"KV_DATABASE_URL": fresh_database_url, **KV_ENV})
    wait_ready(kv)
    drive_traffic(kv.http, "obs")
    scrape = requests.get(f"{kv.metrics}/metrics", timeout=10)
    assert scrape.status_code == 200
    assert scrape.headers["Content-Type"].startswith("text/plain")
    text = scrape.text

    res = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"promtool check metrics:\n{res.stdout}{res.stderr}"

    types, helps, samples = parse_exposition(text)
    sample_names = {n for n, _ in samples}
    missing = []
    for name, (typ, labels) in CATALOGUE.items():
        if types.get(name) != typ:
            missing.append(f"{name}: TYPE {types.get(name)!r}, contract says {typ}")
            continue
        if not helps.get(name):
            missing.append(f"{name}: no HELP")
        names = {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if typ == "histogram" else {name}
        if not names <= sample_names:
            missing.append(f"{name}: no samples")
        for n, lab in samples:
            if n in names:
                got = set(lab) - {"le"}
                if got != labels:
                    missing.append(f"{name}: labels {sorted(got)}, contract says {sorted(labels)}")
                    break
    assert not missing, "metrics missing or off-contract:\n" + "\n".join(missing)
    for family in types:
        assert helps.get(family), f"{family} has no HELP text"
    for n, lab in samples:
        for label, allowed in BOUNDED_LABELS.items():
            if label in lab and n.startswith("kvstore_"):
                assert lab[label] in allowed, f"{n}{{{label}={lab[label]!r}}} is not a bounded value"
    build = [lab for n, lab in samples if n == "kvstore_build_info"]
    assert len(build) == 1 and build[0]["version"], build

    used = {}
    for label, expr in panel_queries(load_dashboard()) + annotation_queries(load_dashboard()):
        for n in metric_names(expr):
            used.setdefault(n, label)
    for r in rule_list():
        for n in metric_names(r["expr"]):
            used.setdefault(n, f"rule {r.get('alert') or r.get('record')}")
    recorded = {r["record"] for r in rule_list() if "record" in r}
    absent = [f"{n} (used by {where})" for n, where in sorted(used.items())
              if n not in sample_names and n not in recorded and not exempt_reason(n)]
    assert not absent, "names used by the dashboard/rules but not in the service's /metrics:\n" + "\n".join(absent)
    assert {n for n in used if n.startswith("kvstore_")} >= {"kvstore_db_up", "kvstore_http_requests_total"}


# ----------------------------------------------------------------------------- real Prometheus

class Prom:
    def __init__(self, base: str):
        self.base = base

    def query(self, expr: str) -> list:
        r = requests.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data["resultType"]
        return data["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def wait(self, expr: str, what: str, timeout: float = 20) -> list:
        deadline = time.monotonic() + timeout
        while True:
            try:
                res = self.query(expr)
            except (requests.RequestException, AssertionError, ValueError):
                res = []
            if res:
                return res
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {what} (no result for {expr} in {timeout:.0f} s)")
            time.sleep(0.5)


@pytest.fixture
def own_database():
    """A MariaDB of this test's own, so the test can stop it. Yields (url, pid)."""
    script = REPO / "scripts" / "throwaway-mariadb.sh"
    res = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        pytest.fail("could not start a throwaway MariaDB: install a MariaDB server "
                    "(apt-get install -y mariadb-server). " + res.stderr.strip(), pytrace=False)
    info = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    pid = int(info["PID"])
    try:
        subprocess.run(["mariadb", "--no-defaults", f"--socket={info['DIR']}/sock", "-uroot",
                        "-e", "CREATE DATABASE kvstore"], check=True, capture_output=True, timeout=30)
        yield info["URL"], pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        subprocess.run([str(script), "stop", info["DIR"]], timeout=60)


def freeze(pid: int) -> None:
    """SIGSTOP, then wait until every thread is stopped: kill() returns before the kernel has
    stopped them all, and a query sent in that gap is still answered (a 404 instead of a 503)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while True:
        states = []
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append(task.joinpath("stat").read_text().rsplit(") ", 1)[1][0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # the thread exited meanwhile
        if states and all(s == "T" for s in states):
            return
        assert time.monotonic() < deadline, f"database threads still running 10 s after SIGSTOP: {states}"
        time.sleep(0.005)


def scrape_path_from_servicemonitor() -> str:
    """The ServiceMonitor's endpoint path (the Kubernetes component's), else the contract's /metrics."""
    for f in sorted((REPO / "kustomize").rglob("*.yaml")) if (REPO / "kustomize").is_dir() else []:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError:
            continue
        for d in docs:
            if isinstance(d, dict) and d.get("kind") == "ServiceMonitor":
                return d["spec"]["endpoints"][0].get("path", "/metrics")
    return "/metrics"


@pytest.fixture
def prometheus_server(tmp_path):
    exe = tool("prometheus", "install Prometheus (apt-get install -y --no-install-recommends prometheus)")
    procs = []

    def start(targets: list[tuple[str, str]], metrics_path: str) -> Prom:
        rules = extract_rules.write_plain_rules(tmp_path / extract_rules.RULES_NAME)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": "kvstore",
                "metrics_path": metrics_path,
                "static_configs": [{"targets": [addr], "labels": {"namespace": LIVE_NAMESPACE, "pod": pod}}
                                   for addr, pod in targets],
            }],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")
        proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        prom = Prom(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if requests.get(f"{prom.base}/-/ready", timeout=1).status_code == 200:
                    return prom
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError("Prometheus not ready in 20 s:\n" + (tmp_path / "prometheus.log").read_text())

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_real_prometheus_has_data_for_every_panel_and_evaluates_every_rule(
        start_kvstore, own_database, prometheus_server):
    """(e) two replicas scraped by a real Prometheus with the rules loaded, through hits, misses,
    writes, 4xx and 503s from a stopped database: every panel query returns data, every rule
    evaluates, and the database and error-budget alerts start pending."""
    db_url, db_pid = own_database
    env = {"KV_DATABASE_URL": db_url, "KV_INVALIDATION_INTERVAL": "250ms", **KV_ENV}
    a = start_kvstore(env)
    b = start_kvstore(env)
    wait_ready(a)
    wait_ready(b)
    path = scrape_path_from_servicemonitor()
    targets = [(a.metrics.removeprefix("http://"), "kvstore-a"), (b.metrics.removeprefix("http://"), "kvstore-b")]
    prom = prometheus_server(targets, path)
    prom.wait('count(up{job="kvstore"} == 1) == 2', "both kvstore targets up")

    # Healthy traffic over several scrapes, on both replicas.
    s = requests.Session()
    deadline = time.monotonic() + 6
    r = 0
    while time.monotonic() < deadline or r < 2:
        drive_traffic(a.http, "a", 1)
        drive_traffic(b.http, "b", 1)
        # a replica write drops the key from the other replica's cache (invalidation)
        assert s.get(kv_url(a.http, "shared"), timeout=10).status_code in (200, 404)
        assert s.put(kv_url(b.http, "shared"), json={"value": r}, timeout=10).status_code in (200, 201)
        r += 1
    prom.wait(f'sum(kvstore_cache_invalidations_total{{job="kvstore"}}) > 0',
              "a write on one replica invalidates the key on the other", timeout=10)

    # Stop the database: cached reads still answer, misses and writes get 503.
    assert s.get(kv_url(a.http, "a/k1"), timeout=10).status_code == 200
    freeze(db_pid)
    statuses = []

    def failing(base: str, tag: str, n: int):
        fs = requests.Session()
        for i in range(n):
            for res in (fs.get(kv_url(base, f"{tag}/gone-{i}"), timeout=10),
                        fs.put(kv_url(base, f"{tag}/w{i}"), json={"value": i}, timeout=10)):
                statuses.append(res.status_code)

    threads = [threading.Thread(target=failing, args=(kv.http, f"down{j}", 3)) for j, kv in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    cached = s.get(kv_url(a.http, "a/k1"), timeout=10)
    for t in threads:
        t.join(timeout=60)
    assert cached.status_code == 200, "a cached key must still be served with the database down"
    assert statuses and set(statuses) == {503}, statuses
    prom.wait('max(kvstore_db_up{job="kvstore"}) == 0', "kvstore_db_up drops to 0 on both replicas")
    prom.wait('sum(rate(kvstore_http_requests_total{job="kvstore", status_class="5xx"}[1m])) > 0',
              "the 503s are counted")
    prom.wait('ALERTS{alertname="KvstoreDatabaseUnreachable"}', "KvstoreDatabaseUnreachable pending", timeout=10)
    prom.wait('ALERTS{alertname="KvstoreErrorBudgetBurnFast"}', "KvstoreErrorBudgetBurnFast pending", timeout=10)

    # Every dashboard query: no error, and data (at least one non-NaN sample).
    dash = load_dashboard()
    problems = []
    for label, expr in panel_queries(dash):
        try:
            res = prom.query(substitute(expr))
        except AssertionError as e:
            problems.append(f"{label}: error {e}")
            continue
        if not any(not math.isnan(float(x["value"][1])) for x in res):
            problems.append(f"{label}: no data ({len(res)} series, all NaN)" if res else f"{label}: no data")
    for label, expr in annotation_queries(dash):
        try:
            prom.query(substitute(expr))
        except AssertionError as e:
            problems.append(f"{label}: error {e}")
    # Every rule expression evaluates, and Prometheus' own evaluation of the rules is healthy.
    for rule in rule_list():
        try:
            prom.query(rule["expr"])
        except AssertionError as e:
            problems.append(f"rule {rule.get('alert') or rule.get('record')}: error {e}")
    groups = requests.get(f"{prom.base}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rl for g in groups for rl in g["rules"]]
    assert len(loaded) == len(rule_list())
    for rl in loaded:
        if rl.get("health") != "ok" and rl.get("lastError"):
            problems.append(f"rule {rl['name']}: {rl.get('health')} {rl.get('lastError')}")
    assert not problems, "\n".join(problems)

    # The dashboard tells the story of this run.
    v = prom.value
    assert v(substitute('sum(up{namespace=~"$namespace", job=~"$job", pod=~"$pod"})')) == 2
    assert v('min(kvstore_db_up{job="kvstore"})') == 0
    assert v('sum(increase(kvstore_cache_hits_total{job="kvstore"}[1m]))') > 0
    assert v('sum(increase(kvstore_cache_misses_total{job="kvstore"}[1m]))') > 0
    assert v('sum(kvstore_writes_total{job="kvstore", operation="upsert"})') > 0
    assert v('sum(kvstore_writes_total{job="kvstore", operation="delete"})') > 0
    assert v('sum(kvstore_http_requests_total{job="kvstore", status_class="4xx"})') > 0
    assert v('sum(kvstore_db_errors_total{job="kvstore"})') > 0
    assert v('sum(kvstore_cache_evictions_total{job="kvstore", cause="size"})') > 0
    assert v('kvstore:slo_availability_errors:ratio_rate5m{job="kvstore"}') > 0.00144
