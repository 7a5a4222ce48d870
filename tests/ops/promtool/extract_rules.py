#!/usr/bin/env python3
"""Turn the PrometheusRule into a plain Prometheus rule file and run promtool on it.

promtool reads plain rule files (`groups:` at the top), not the PrometheusRule custom resource,
so the tests extract `spec.groups` first.

    python3 tests/ops/promtool/extract_rules.py            # check + unit-test, exit 1 on failure
    python3 tests/ops/promtool/extract_rules.py OUT.yaml   # only write the plain rule file

The unit-test files (tests/ops/promtool/*_test.yaml) name their rule file `kvstore.rules.yaml`;
`run_promtool` copies them next to a freshly extracted one in a temporary directory, so nothing is
generated inside the repository.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROMETHEUS_RULE = REPO / "kustomize" / "components" / "monitoring" / "prometheusrule.yaml"
RULES_NAME = "kvstore.rules.yaml"


def load_prometheus_rule(path: pathlib.Path = PROMETHEUS_RULE) -> dict:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "PrometheusRule":
        raise ValueError(f"{path} is not a PrometheusRule")
    return doc


def groups(path: pathlib.Path = PROMETHEUS_RULE) -> list[dict]:
    return load_prometheus_rule(path)["spec"]["groups"]


def write_plain_rules(out: pathlib.Path, path: pathlib.Path = PROMETHEUS_RULE) -> pathlib.Path:
    out.write_text(yaml.safe_dump({"groups": groups(path)}, sort_keys=False))
    return out


def unit_test_files() -> list[pathlib.Path]:
    return sorted(HERE.glob("*_test.yaml"))


def promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        raise FileNotFoundError("promtool not found: install Prometheus "
                                "(apt-get install -y --no-install-recommends prometheus)")
    return exe


def run_promtool(workdir: pathlib.Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`promtool check rules` and `promtool test rules` on the extracted rules in workdir."""
    rules = write_plain_rules(workdir / RULES_NAME)
    tests = []
    for f in unit_test_files():
        shutil.copy(f, workdir / f.name)
        tests.append(str(workdir / f.name))
    check = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True,
                           text=True, timeout=120)
    test = subprocess.run([promtool(), "test", "rules", *tests], capture_output=True, text=True,
                          timeout=300, cwd=workdir)
    return check, test


def main(argv: list[str]) -> int:
    if len(argv) == 2:
        write_plain_rules(pathlib.Path(argv[1]))
        return 0
    with tempfile.TemporaryDirectory() as d:
        check, test = run_promtool(pathlib.Path(d))
        for res in (check, test):
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
        return 0 if check.returncode == 0 and test.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
