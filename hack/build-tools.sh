#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kubectl, etcd, helm and a kstatus checker from the Go module proxy into a
# cache outside the work tree, keyed by version. Rebuilds only what is missing.
# Prints the bin directory on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${NUBES_CACHE:-$HOME/.cache/nubes}
export GOFLAGS=-mod=mod CGO_ENABLED=0
ldflags="-s -w"

log() { echo "build-tools: $*" >&2; }

build_kube() {
  local out=$cache/tools/kubernetes-$KUBE_VERSION
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl) missing=() c
  for c in "${cmds[@]}"; do [[ -x $out/$c ]] || missing+=("$c"); done
  ((${#missing[@]})) || return 0
  local minor=${KUBE_VERSION#v1.}            # e.g. 35.4
  local staging_version=v0.$minor
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building ${missing[*]} $KUBE_VERSION (takes a while on a cold cache)"
  (
    cd "$work"
    {
      echo "module nubes.local/kubetools"
      echo "go 1.25"
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      # k8s.io/kubernetes requires its staging modules at v0.0.0 with local
      # replaces; point each at its published release instead.
      curl -fsS "https://proxy.golang.org/k8s.io/kubernetes/@v/$KUBE_VERSION.mod" \
        | sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#replace \1 => \1 '"$staging_version"'#p'
    } > go.mod
    { echo 'package tools'; echo 'import ('; for c in "${cmds[@]}"; do echo " _ \"k8s.io/kubernetes/cmd/$c\""; done; echo ')'; } > tools.go
    go mod tidy >&2
    mkdir -p "$out"
    version_flags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
    for c in "${missing[@]}"; do
      go build -trimpath -ldflags "$ldflags $version_flags" -o "$out/$c.tmp" "k8s.io/kubernetes/cmd/$c"
      mv "$out/$c.tmp" "$out/$c"
    done
  )
}

build_etcd() {
  local out=$cache/tools/etcd-$ETCD_VERSION
  if [[ -x $out/etcd ]]; then return; fi
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building etcd $ETCD_VERSION"
  (
    cd "$work"
    printf 'module nubes.local/etcdtool\ngo 1.25\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
    printf 'package main\nimport (\n "os"\n "go.etcd.io/etcd/server/v3/etcdmain"\n)\nfunc main() { etcdmain.Main(os.Args) }\n' > main.go
    go mod tidy >&2
    mkdir -p "$out.tmp"
    go build -trimpath -ldflags "$ldflags" -o "$out.tmp/etcd" .
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_helm() {
  local out=$cache/tools/helm-$HELM_VERSION
  if [[ -x $out/helm ]]; then return; fi
  log "building helm $HELM_VERSION"
  GOBIN="$out.tmp" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_kstatus() { # keyed by the cli-utils version and the checker's source
  local key; key=$(sha256sum "$here/kstatus/main.go" | cut -c1-8)
  local out=$cache/tools/kstatus-$CLI_UTILS_VERSION-$key
  if [[ -x $out/kstatus-check ]]; then return; fi
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "building kstatus-check (sigs.k8s.io/cli-utils $CLI_UTILS_VERSION)"
  cp "$here/kstatus/main.go" "$work/"
  (
    cd "$work"
    printf 'module nubes.local/kstatus\ngo 1.25\nrequire sigs.k8s.io/cli-utils %s\n' "$CLI_UTILS_VERSION" > go.mod
    go mod tidy >&2
    mkdir -p "$out.tmp"
    go build -trimpath -ldflags "$ldflags" -o "$out.tmp/kstatus-check" .
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
  # Earlier builds of the checker go.
  find "$cache/tools" -maxdepth 1 -name 'kstatus-*' ! -name "${out##*/}" -exec rm -rf {} +
}

link_bin() {
  local bin=$cache/bin
  mkdir -p "$bin"
  ln -sf "$cache/tools/kubernetes-$KUBE_VERSION/kube-apiserver" "$bin/kube-apiserver"
  ln -sf "$cache/tools/kubernetes-$KUBE_VERSION/kubectl" "$bin/kubectl"
  ln -sf "$cache/tools/kubernetes-$KUBE_VERSION/kube-controller-manager" "$bin/kube-controller-manager"
  ln -sf "$cache/tools/kubernetes-$KUBE_VERSION/kube-scheduler" "$bin/kube-scheduler"
  ln -sf "$cache/tools/kubernetes-$KUBE_VERSION/kubelet" "$bin/kubelet"
  ln -sf "$cache/tools/etcd-$ETCD_VERSION/etcd" "$bin/etcd"
  ln -sf "$cache/tools/helm-$HELM_VERSION/helm" "$bin/helm"
  ln -sf "$cache/tools/kstatus-$CLI_UTILS_VERSION-$(sha256sum "$here/kstatus/main.go" | cut -c1-8)/kstatus-check" "$bin/kstatus-check"
  echo "$bin"
}

mkdir -p "$cache/tools"
build_etcd
build_helm
build_kube
build_kstatus
link_bin
