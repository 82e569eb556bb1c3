#!/usr/bin/env bash
# Installs those of the Debian packages named that are not installed yet: as root, without
# prompts, without recommends, keeping changed config files.
#
#   deploy/apt-install.sh PACKAGE...
#
# `apt-get update` only if the install fails without it (the package lists may be missing or
# stale: they are refreshed once; sources this machine cannot reach only warn, the Debian ones
# are what is needed). Exits 0 at once when every package is installed. Used by
# deploy/ci/test-tools.sh and deploy/docker/engine-up.sh, which decide what is missing by the
# programs they need (one may come from elsewhere than Debian's package).
set -euo pipefail

say() { echo "apt-install: $*" >&2; }

missing=()
for package in "$@"; do
  status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
  [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "not root: cannot install ${missing[*]}"
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
install_missing() {
  apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
    "${missing[@]}" </dev/null
}
say "installing ${missing[*]}"
started=$SECONDS
if ! install_missing; then
  apt-get update -q </dev/null || say "apt-get update reported errors (continuing)"
  install_missing
fi
say "installed in $((SECONDS - started)) s"
