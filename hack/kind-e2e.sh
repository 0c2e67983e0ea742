#!/usr/bin/env bash
# flowmap on a real cluster, end to end, for machines with Docker (CI has no Docker engine):
# a two-node kind cluster, the image built from this tree and loaded into it, the base installed
# with that image, a client on one node calling a server on the other through its Service, and
# then the wait until `kubectl get connections` shows their edge.
#
#   hack/kind-e2e.sh
#
# Needs docker, kind (v0.23 or later: Kubernetes 1.30+) and kubectl. Environment:
#   KEEP=1     keep the cluster afterwards (default: delete it, even on failure)
#   CLUSTER    kind cluster name (flowmap-e2e)
#   IMAGE      image to build and load (flowmap:kind-e2e)
#   TIMEOUT    seconds to wait for each step (300)
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-flowmap-e2e}
IMAGE=${IMAGE:-flowmap:kind-e2e}
TIMEOUT=${TIMEOUT:-300}
BASE_IMAGE=ghcr.io/flowmap-dev/flowmap  # the name manifests/kustomization.yaml gives the image
APP_NS=flowmap-e2e                      # the test client and server
SERVER_NODE=$CLUSTER-worker
CLIENT_NODE=$CLUSTER-control-plane

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is needed" >&2; exit 1; }
done

say() { printf '\n== %s\n' "$*"; }

# A kustomize overlay may not name its base by an absolute path: it lives in the tree (ignored by git).
overlay=$(mktemp -d "$PWD/hack/.kind-e2e.XXXXXX")
kubectl_ctx=(kubectl --context "kind-$CLUSTER")

finish() {
  local status=$?
  if [ "$status" -ne 0 ] && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "failed: what the cluster shows"
    "${kubectl_ctx[@]}" get pods -A -o wide || true
    "${kubectl_ctx[@]}" -n flowmap-system logs deployment/flowmap-operator --tail=50 || true
    "${kubectl_ctx[@]}" -n flowmap-system logs daemonset/flowmap-agent --tail=50 || true
    "${kubectl_ctx[@]}" -n flowmap-system logs daemonset/flowmap-dp --tail=50 || true
  fi
  rm -rf "$overlay"
  if [ "${KEEP:-0}" = 1 ]; then
    echo "kept the cluster: kubectl --context kind-$CLUSTER ...; kind delete cluster --name $CLUSTER"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap finish EXIT

say "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config hack/kind-cluster.yaml --wait "${TIMEOUT}s"

say "image $IMAGE"
DOCKER_BUILDKIT=1 docker build -t "$IMAGE" .  # the Dockerfile mounts a build secret (BuildKit)
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "flowmap: CRDs first (the base holds a ClusterKopfPeering), then the base with $IMAGE"
"${kubectl_ctx[@]}" apply --server-side -k crds/
"${kubectl_ctx[@]}" wait --for=condition=Established --timeout="${TIMEOUT}s" crd -l app.kubernetes.io/part-of=flowmap
cat >"$overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../manifests
images:
  - name: $BASE_IMAGE
    newName: ${IMAGE%:*}
    newTag: ${IMAGE##*:}
EOF
"${kubectl_ctx[@]}" apply --server-side -k "$overlay"
"${kubectl_ctx[@]}" -n flowmap-system rollout status deployment/flowmap-operator --timeout="${TIMEOUT}s"
"${kubectl_ctx[@]}" -n flowmap-system rollout status daemonset/flowmap-dp --timeout="${TIMEOUT}s"
"${kubectl_ctx[@]}" -n flowmap-system rollout status daemonset/flowmap-agent --timeout="${TIMEOUT}s"

say "a server on $SERVER_NODE, a client on $CLIENT_NODE calling it through its Service"
"${kubectl_ctx[@]}" create namespace "$APP_NS"
"${kubectl_ctx[@]}" -n "$APP_NS" apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: server}
spec:
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      nodeSelector: {kubernetes.io/hostname: $SERVER_NODE}
      containers:
        - name: httpd
          image: busybox:1.36.1
          command: [sh, -c, 'echo flowmap > /tmp/index.html && exec httpd -f -p 8080 -h /tmp']
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      nodeSelector: {kubernetes.io/hostname: $CLIENT_NODE}
      tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
      containers:
        - name: curl
          image: busybox:1.36.1
          command: [sh, -c, 'while true; do wget -q -O /dev/null http://server/ || true; sleep 1; done']
EOF
"${kubectl_ctx[@]}" -n "$APP_NS" rollout status deployment/server --timeout="${TIMEOUT}s"
"${kubectl_ctx[@]}" -n "$APP_NS" rollout status deployment/client --timeout="${TIMEOUT}s"

say "waiting for the edge $APP_NS.client -> $APP_NS.server"
# The agents start before the operator has published its CA; they retry until the kubelet has
# mounted it (about a minute on a fresh install).
deadline=$((SECONDS + TIMEOUT))
edge=""
while [ -z "$edge" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "kind-e2e: no Connection from $APP_NS.client to $APP_NS.server after ${TIMEOUT}s" >&2
    "${kubectl_ctx[@]}" get connections || true
    exit 1
  fi
  sleep 5
  edge=$("${kubectl_ctx[@]}" get connections -o jsonpath='{range .items[*]}{.spec.client}{" "}{.spec.server}{" "}{.metadata.name}{"\n"}{end}' \
    | awk -v c="$APP_NS.client" -v s="$APP_NS.server" '$1 == c && $2 == s {print $3; exit}')
done

say "the map"
"${kubectl_ctx[@]}" get connection "$edge"
"${kubectl_ctx[@]}" get groups.flowmap.dev "$APP_NS.client" "$APP_NS.server"
echo "kind-e2e: ok"
