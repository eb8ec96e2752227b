#!/usr/bin/env bash
# Lint the deploy files with their own tools (`make lint` runs this; so does tests/test_deploy.py).
#
#   hadolint              both Dockerfiles, every rule at every level (inline ignores carry a reason)
#   docker-compose        `config` of compose.yaml for each profile (the real Compose parser)
#   kubernetes-validate   the core objects of k8s/ against Kubernetes' OpenAPI schemas, strict
#   kubectl kustomize     k8s/ builds                                   (optional: when kubectl exists)
#   promtool              prometheus.yml               (optional: Debian `apt-get install prometheus`)
#
# The first three come with the dev extra (deploy/install.sh cpu|gpu --dev); put the venv's bin/ on
# PATH. A missing optional tool is reported and skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

need() {
    command -v "$1" >/dev/null || {
        echo "lint.sh: $1 is not installed (deploy/install.sh cpu --dev installs it)" >&2
        exit 1
    }
}
optional() {
    command -v "$1" >/dev/null && return 0
    echo "lint.sh: $1 is not installed: $2 skipped" >&2
    return 1
}
need hadolint
need docker-compose
need kubernetes-validate

hadolint --failure-threshold info Dockerfile Dockerfile.cpu
for profile in cpu gpu; do
    env -i PATH="$PATH" HOME="${HOME:-/tmp}" docker-compose -f compose.yaml --profile "$profile" config --quiet
done
# The Kustomization and the ServiceMonitor (a CRD) are not core API objects: no schema for them.
kubernetes-validate --strict --quiet --kubernetes-version 1.33.0 \
    k8s/deployment.yaml k8s/service.yaml k8s/pvc.yaml k8s/secret.yaml
if optional kubectl "the kustomize build of k8s/"; then
    kubectl kustomize k8s >/dev/null
fi
if optional promtool "the check of prometheus.yml"; then
    promtool check config prometheus.yml
fi
echo "lint.sh: deploy files OK"
