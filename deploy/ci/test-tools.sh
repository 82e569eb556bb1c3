#!/usr/bin/env bash
# Installs, when absent, the programs the test suite runs for real besides the Docker engine
# (deploy/docker/engine-up.sh): sshd for the ssh host provider's tests (tests/sshd.py starts a
# throw-away one on loopback) and kubectl, which renders the Kubernetes manifests offline
# (tests/unit/test_kubernetes_manifests.py). Idempotent, no prompts; `apt-get update` only if
# an install fails without it. Called by .ci/run; a developer may run it too (as root).
set -euo pipefail

say() { echo "test-tools: $*" >&2; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "not root: cannot install ${missing[*]} (the tests that need them will fail)"
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
    "${missing[@]}" </dev/null
}
say "installing ${missing[*]}"
started=$SECONDS
if ! apt_install; then
  apt-get update -q </dev/null || say "apt-get update reported errors (continuing)"
  apt_install
fi
say "installed in $((SECONDS - started)) s"
