#!/usr/bin/env bash
# Build the balancer and example-worker images, load them into a kind
# cluster (created from deploy/kind/cluster.yaml if it does not exist), and
# apply deploy/overlays/kind. Needs docker (with a running engine), kind and
# kubectl on PATH. Run from anywhere:
#
#   deploy/kind/apply.sh
#
# Environment: KIND_CLUSTER (default stepflow-lb), SKIP_BUILD=1 to reuse
# images already built.
set -euo pipefail

cluster="${KIND_CLUSTER:-stepflow-lb}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
context="kind-${cluster}"
lb_image="stepflow-lb:local"
worker_image="stepflow-example-worker:local"

for tool in docker kind kubectl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "apply.sh: '$tool' is not on PATH" >&2
    exit 1
  fi
done

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "==> creating kind cluster '$cluster'"
  kind create cluster --name "$cluster" --config "$repo/deploy/kind/cluster.yaml"
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  echo "==> building $lb_image"
  docker build -t "$lb_image" -f "$repo/Dockerfile" "$repo"
  echo "==> building $worker_image"
  docker build -t "$worker_image" -f "$repo/deploy/worker/Dockerfile" "$repo"
fi

echo "==> loading images into '$cluster'"
kind load docker-image --name "$cluster" "$lb_image" "$worker_image"

already_deployed=0
if kubectl --context "$context" -n stepflow get deployment/stepflow-lb >/dev/null 2>&1; then
  already_deployed=1
fi

echo "==> applying deploy/overlays/kind"
kubectl --context "$context" apply -k "$repo/deploy/overlays/kind"

# Images are tagged :local, so a rebuild leaves the pod templates unchanged;
# on a re-run, restart so that the freshly loaded images are used.
if [[ "$already_deployed" == 1 ]]; then
  kubectl --context "$context" -n stepflow rollout restart \
    deployment/stepflow-worker deployment/stepflow-lb
fi

echo "==> waiting for rollouts"
kubectl --context "$context" -n stepflow rollout status deployment/stepflow-worker --timeout=180s
kubectl --context "$context" -n stepflow rollout status deployment/stepflow-lb --timeout=180s

cat <<MSG
==> done. Try it:
  kubectl --context $context -n stepflow port-forward svc/stepflow-lb 8080:8080 9090:9090
  curl -s localhost:9090/debug/backends
(docs/quickstart.md has the rest.)
MSG
