#!/usr/bin/env bash
# `just deploy-dev`: the whole stack on a local kind cluster, from nothing or again (safe to
# re-run: every step creates what is missing and updates what exists).
#
#   1. check docker, kind, kubectl, helm, curl
#   2. create (or reuse) the kind cluster "kvstore", host ports 80/443 mapped for the ingress
#   3. install/upgrade ingress-nginx and kube-prometheus-stack (Prometheus, Grafana) with helm
#   4. build the image kvstore:dev and load it into the kind node
#   5. kubectl apply -k kustomize/overlays/dev (namespace kvstore-dev)
#   6. wait for MySQL and kvstore to be rolled out
#   7. smoke test through a port-forward: GET Homer, PUT then GET a key
#   8. print how to reach the API, Grafana and Prometheus
#
# Settings (environment): KIND_CLUSTER (kvstore), HTTP_PORT (80), HTTPS_PORT (443): the host
# ports the ingress is published on; change them if 80/443 are taken on your machine.
# INGRESS_NGINX_CHART_VERSION (4.13.2), KUBE_PROMETHEUS_STACK_CHART_VERSION (80.4.1): the
# charts are pinned, so that a re-run months later installs what was tested, not whatever
# the repositories publish that day (their values below are written for these versions).
set -euo pipefail

cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-kvstore}
CONTEXT="kind-$CLUSTER"
NS=kvstore-dev
MON_NS=monitoring
IMAGE=kvstore:dev
HTTP_PORT=${HTTP_PORT:-80}
HTTPS_PORT=${HTTPS_PORT:-443}
INGRESS_NGINX_CHART_VERSION=${INGRESS_NGINX_CHART_VERSION:-4.13.2}
KUBE_PROMETHEUS_STACK_CHART_VERSION=${KUBE_PROMETHEUS_STACK_CHART_VERSION:-80.4.1}
VERSION=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
REVISION=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "deploy-dev: $*" >&2; exit 1; }
# Every kubectl and helm call names the kind context: never touch another cluster.
k() { kubectl --context "$CONTEXT" "$@"; }

# --- 1. prerequisites: one sentence each -----------------------------------------------
step "Checking prerequisites"
missing=0
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "deploy-dev: $1 is missing: $2" >&2
    missing=1
  fi
}
need docker "install Docker Engine or Docker Desktop (https://docs.docker.com/get-docker/) to build the image and run kind."
need kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), e.g. 'go install sigs.k8s.io/kind@latest' or 'brew install kind'."
need kubectl "install kubectl (https://kubernetes.io/docs/tasks/tools/), v1.29 or newer (README: Prerequisites; it embeds kustomize v5)."
need helm "install helm 3 (https://helm.sh/docs/intro/install/), e.g. 'brew install helm'."
need curl "install curl (used by the smoke test)."
[ "$missing" = 0 ] || exit 1
docker info >/dev/null 2>&1 \
  || die "docker is installed but its daemon does not answer: start Docker (or add your user to the docker group)."
echo "docker, kind, kubectl, helm and curl found"

# --- 2. the kind cluster ---------------------------------------------------------------
step "kind cluster '$CLUSTER'"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster (kind delete cluster --name $CLUSTER to start over)"
  kind export kubeconfig --name "$CLUSTER" >/dev/null
else
  # The node is labelled ingress-ready and publishes its ports 80/443 on the host, so the
  # ingress controller (hostPort) answers on http://localhost:$HTTP_PORT/.
  kind create cluster --name "$CLUSTER" --wait 120s --config - <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    kubeadmConfigPatches:
      - |
        kind: InitConfiguration
        nodeRegistration:
          kubeletExtraArgs:
            node-labels: "ingress-ready=true"
    extraPortMappings:
      - containerPort: 80
        hostPort: $HTTP_PORT
        protocol: TCP
      - containerPort: 443
        hostPort: $HTTPS_PORT
        protocol: TCP
EOF
fi
k cluster-info >/dev/null || die "cannot reach the cluster through context $CONTEXT."

# --- 3. ingress-nginx and kube-prometheus-stack ------------------------------------------
step "Helm charts: ingress-nginx, kube-prometheus-stack"
helm repo add ingress-nginx https://kubernetes.github.io/ingress-nginx --force-update >/dev/null
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
helm repo update ingress-nginx prometheus-community >/dev/null

values_dir=$(mktemp -d)
pf_pid=""
cleanup() {
  if [ -n "$pf_pid" ]; then kill "$pf_pid" 2>/dev/null || true; fi
  rm -rf "$values_dir"
}
trap cleanup EXIT

# ingress-nginx the kind way: on the ingress-ready node, bound to the node's ports 80/443.
cat >"$values_dir/ingress-nginx.yaml" <<'EOF'
controller:
  hostPort:
    enabled: true
  service:
    type: NodePort
  nodeSelector:
    ingress-ready: "true"
    kubernetes.io/os: linux
  tolerations:
    - key: node-role.kubernetes.io/control-plane
      operator: Exists
      effect: NoSchedule
  publishService:
    enabled: false
  extraArgs:
    publish-status-address: localhost
  ingressClassResource:
    name: nginx
    default: true
EOF
helm upgrade --install ingress-nginx ingress-nginx/ingress-nginx \
  --version "$INGRESS_NGINX_CHART_VERSION" \
  --kube-context "$CONTEXT" --namespace ingress-nginx --create-namespace \
  --values "$values_dir/ingress-nginx.yaml" --wait --timeout 10m

# kube-prometheus-stack: Prometheus selects every ServiceMonitor/PrometheusRule in the
# cluster (not only those labelled with the release), and Grafana's sidecar loads every
# ConfigMap labelled grafana_dashboard="1" from every namespace (ours is in kvstore-dev).
# Control-plane scrapes that kind does not expose are switched off (they would only alert).
cat >"$values_dir/kube-prometheus-stack.yaml" <<'EOF'
prometheus:
  prometheusSpec:
    serviceMonitorSelectorNilUsesHelmValues: false
    podMonitorSelectorNilUsesHelmValues: false
    ruleSelectorNilUsesHelmValues: false
    # the slow-burn SLO alerts look back 3 days
    retention: 3d
grafana:
  sidecar:
    dashboards:
      enabled: true
      label: grafana_dashboard
      labelValue: "1"
      searchNamespace: ALL
      # the dashboard ConfigMap's grafana_folder annotation picks its Grafana folder
      folderAnnotation: grafana_folder
      provider:
        foldersFromFilesStructure: true
kubeEtcd:
  enabled: false
kubeControllerManager:
  enabled: false
kubeScheduler:
  enabled: false
kubeProxy:
  enabled: false
EOF
helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack \
  --version "$KUBE_PROMETHEUS_STACK_CHART_VERSION" \
  --kube-context "$CONTEXT" --namespace "$MON_NS" --create-namespace \
  --values "$values_dir/kube-prometheus-stack.yaml" --wait --timeout 15m

# --- 4. the image ----------------------------------------------------------------------
step "Building $IMAGE (version $VERSION, revision $REVISION) and loading it into kind"
docker build --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"
image_id=$(docker image inspect --format '{{.Id}}' "$IMAGE")

# --- 5. the manifests --------------------------------------------------------------------
step "Applying kustomize/overlays/dev"
# Server-side apply: no last-applied annotation (the dashboard ConfigMap is big), and field
# ownership that survives re-runs.
k apply --server-side --force-conflicts -k kustomize/overlays/dev

# The tag kvstore:dev does not change between builds, so a rebuilt image would not roll the
# pods by itself: record the image ID in the pod template, which rolls them when it differs.
current=$(k -n "$NS" get deployment kvstore \
  -o jsonpath='{.spec.template.metadata.annotations.kvstore\.dev/image-id}' 2>/dev/null || true)
if [ "$current" != "$image_id" ]; then
  k -n "$NS" patch deployment kvstore --type merge \
    -p "{\"spec\":{\"template\":{\"metadata\":{\"annotations\":{\"kvstore.dev/image-id\":\"$image_id\"}}}}}"
fi

# --- 6. rollouts -------------------------------------------------------------------------
step "Waiting for MySQL and kvstore"
# The first MySQL start initialises the data directory: a minute or two.
k -n "$NS" rollout status statefulset/mysql --timeout=10m
# kvstore pods that started before MySQL was up have waited for it without restarting (they
# bind at once and retry the database in the background); they turn ready by themselves.
k -n "$NS" rollout status deployment/kvstore --timeout=10m

# --- 7. smoke test -----------------------------------------------------------------------
step "Smoke test through kubectl port-forward"
local_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18080)
k -n "$NS" port-forward svc/kvstore "$local_port:80" >/dev/null 2>&1 &
pf_pid=$!
base="http://127.0.0.1:$local_port"
for _ in $(seq 1 50); do
  curl -fsS -o /dev/null "$base/healthz" 2>/dev/null && break
  sleep 0.2
done

got=$(curl -fsS "$base/v1/keys/Homer") || die "GET /v1/keys/Homer failed (kubectl -n $NS logs deploy/kvstore)."
case "$got" in
  *'"Simpson"'*) echo "GET /v1/keys/Homer -> $got" ;;
  *) die "GET /v1/keys/Homer did not return \"Simpson\": $got" ;;
esac
marker="deployed-$(date +%s)"
curl -fsS -X PUT -H 'Content-Type: application/json' -d "{\"value\":\"$marker\"}" \
  -o /dev/null "$base/v1/keys/smoke-test" || die "PUT /v1/keys/smoke-test failed."
got=$(curl -fsS "$base/v1/keys/smoke-test") || die "GET /v1/keys/smoke-test failed."
case "$got" in
  *"\"$marker\""*) echo "PUT then GET /v1/keys/smoke-test -> $got" ;;
  *) die "GET /v1/keys/smoke-test did not return what was just written: $got" ;;
esac
kill "$pf_pid" 2>/dev/null || true
pf_pid=""

ingress_url="http://localhost"
[ "$HTTP_PORT" = 80 ] || ingress_url="http://localhost:$HTTP_PORT"
if curl -fsS -o /dev/null --max-time 5 "$ingress_url/v1/keys/Homer" 2>/dev/null; then
  ingress_note="answers"
else
  ingress_note="not answering yet (the controller may still be syncing; try again in a minute)"
fi

# --- 8. how to reach it ------------------------------------------------------------------
grafana_svc=$(k -n "$MON_NS" get svc -l app.kubernetes.io/name=grafana -o jsonpath='{.items[0].metadata.name}')
# The chart names Grafana's admin Secret like its Service.
grafana_secret=$grafana_svc
prom_svc=$(k -n "$MON_NS" get svc -l app=kube-prometheus-stack-prometheus -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)

cat <<EOF

kvstore is deployed in namespace $NS of kind cluster '$CLUSTER' (kubectl context $CONTEXT).

API through the ingress ($ingress_note):
  curl $ingress_url/v1/keys/Homer
  curl -X PUT -d '{"value": "hello"}' $ingress_url/v1/keys/greeting

API through a port-forward:
  kubectl --context $CONTEXT -n $NS port-forward svc/kvstore 8080:80
  curl http://localhost:8080/v1/keys/Homer

Grafana (dashboard "kvstore"; user admin):
  kubectl --context $CONTEXT -n $MON_NS port-forward svc/$grafana_svc 3000:80
  open http://localhost:3000
  password: kubectl --context $CONTEXT -n $MON_NS get secret $grafana_secret -o jsonpath='{.data.admin-password}' | base64 -d; echo
EOF
if [ -n "$prom_svc" ]; then
  cat <<EOF

Prometheus (targets: Status > Targets, job "kvstore"):
  kubectl --context $CONTEXT -n $MON_NS port-forward svc/$prom_svc 9090:9090
EOF
fi
cat <<EOF

Logs:     kubectl --context $CONTEXT -n $NS logs deploy/kvstore -f
Remove:   just undeploy-dev   (deletes the kind cluster)
EOF
