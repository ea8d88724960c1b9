#!/usr/bin/env bash
# Remove what deploy/kind/apply.sh applied. With --delete-cluster, delete the
# whole kind cluster instead.
#
#   deploy/kind/teardown.sh [--delete-cluster]
#
# Environment: KIND_CLUSTER (default stepflow-lb).
set -euo pipefail

cluster="${KIND_CLUSTER:-stepflow-lb}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
context="kind-${cluster}"

case "${1:-}" in
  --delete-cluster)
    kind delete cluster --name "$cluster"
    ;;
  "")
    kubectl --context "$context" delete -k "$repo/deploy/overlays/kind" \
      --ignore-not-found --wait=true
    ;;
  *)
    echo "usage: $0 [--delete-cluster]" >&2
    exit 2
    ;;
esac
