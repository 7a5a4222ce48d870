#!/usr/bin/env bash
# `just undeploy-dev`: remove what `just deploy-dev` created.
#
#   scripts/undeploy-dev.sh                 delete the whole kind cluster "kvstore"
#                                           (kvstore, MySQL and its volume, monitoring, ingress)
#   scripts/undeploy-dev.sh --keep-cluster  delete only namespace kvstore-dev, including the
#                                           MySQL volume (the StatefulSet keeps PVCs on purpose)
set -euo pipefail

cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-kvstore}
CONTEXT="kind-$CLUSTER"
NS=kvstore-dev

keep_cluster=0
case "${1:-}" in
  "") ;;
  --keep-cluster) keep_cluster=1 ;;
  *) echo "usage: $0 [--keep-cluster]" >&2; exit 2 ;;
esac

command -v kind >/dev/null 2>&1 \
  || { echo "undeploy-dev: kind is missing: install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)." >&2; exit 1; }

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "kind cluster '$CLUSTER' does not exist: nothing to remove."
  exit 0
fi

if [ "$keep_cluster" = 1 ]; then
  command -v kubectl >/dev/null 2>&1 \
    || { echo "undeploy-dev: kubectl is missing: install kubectl (https://kubernetes.io/docs/tasks/tools/)." >&2; exit 1; }
  # Deleting the namespace deletes everything in it, PVCs included.
  kubectl --context "$CONTEXT" delete namespace "$NS" --ignore-not-found --wait=true
  echo "namespace $NS deleted; cluster '$CLUSTER' (ingress-nginx, kube-prometheus-stack) kept."
else
  kind delete cluster --name "$CLUSTER"
  echo "kind cluster '$CLUSTER' deleted."
fi
