#!/usr/bin/env bash
# Installs, when absent, the programs the test suite runs for real besides the Docker engine
# (deploy/docker/engine-up.sh): sshd for the ssh host provider's tests (tests/sshd.py starts a
# throw-away one on loopback), kubectl, which renders the Kubernetes manifests offline
# (tests/unit/test_kubernetes_manifests.py), and chromium with chromedriver for the dashboard's
# browser tests (tests/browser.py). Idempotent, no prompts; `apt-get update` only if
# an install fails without it (deploy/apt-install.sh). Called by .ci/run; a developer may run it
# too (as root).
set -euo pipefail

say() { echo "test-tools: $*" >&2; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
# The dashboard's browser tests (tests/browser.py): Debian's Chromium and its driver.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "not root: cannot install ${missing[*]} (the tests that need them will fail)"
  exit 1
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/../apt-install.sh" "${missing[@]}"
