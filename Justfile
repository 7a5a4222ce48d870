# kvstore: every task a person runs. `just` lists them.
set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

revision := `git rev-parse --short=12 HEAD 2>/dev/null || echo unknown`
version := `grep -m1 '^version' Cargo.toml | cut -d'"' -f2`

# list the recipes
default:
    @just --list

# install what the tests need (MariaDB server, Prometheus, checkers); Debian/Ubuntu, as root
setup:
    scripts/install-tools.sh

# run the service locally against a throwaway MariaDB (Ctrl-C stops both)
run *args:
    scripts/run-local.sh "$@"

# the whole test suite: Rust unit + integration tests, manifests, observability, CI/CD checks
test:
    scripts/test.sh

# formatting and lints
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# the benchmark: throwaway database + release binary + wrk, with baselines
bench:
    scripts/bench.sh

# build the container image kvstore:dev (and kvstore:<version>) with version and revision baked in
image tag="dev":
    docker build --build-arg VERSION={{version}} --build-arg REVISION={{revision}} -t kvstore:{{tag}} -t kvstore:{{version}} .

# render both Kustomize overlays to target/manifests/{dev,prod}.yaml
manifests:
    mkdir -p target/manifests
    kubectl kustomize kustomize/overlays/dev > target/manifests/dev.yaml
    kubectl kustomize kustomize/overlays/prod > target/manifests/prod.yaml
    @echo "rendered target/manifests/dev.yaml and target/manifests/prod.yaml"

# render both overlays, then kubernetes-validate --strict, checkov (manifests + Dockerfile), hadolint
validate:
    scripts/validate-manifests.sh

# the whole stack on a local kind cluster: ingress-nginx, kube-prometheus-stack, MySQL, kvstore (re-runnable)
deploy-dev:
    scripts/deploy-dev.sh

# delete the kind cluster made by deploy-dev (--keep-cluster: only the kvstore-dev namespace)
undeploy-dev *args:
    scripts/undeploy-dev.sh "$@"
