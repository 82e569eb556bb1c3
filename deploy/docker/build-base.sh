#!/usr/bin/env bash
# Build the local Debian base image nbcluster-base:bookworm, once: for machines that cannot pull
# from a registry (the test machine, CI). Users with a registry do not need it: the nbcluster
# image is built FROM python:3.11-slim by default (deploy/docker/README.md).
#
#   deploy/docker/build-base.sh [TAG]      # default TAG: nbcluster-base:bookworm
#
# Idempotent: nothing is done when the image exists; concurrent runs build it once. Needs
# root, debootstrap and a Debian mirror (NBCLUSTER_DEBIAN_MIRROR, default
# http://deb.debian.org/debian).
set -euo pipefail

tag="${1:-nbcluster-base:bookworm}"
mirror="${NBCLUSTER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
say() { echo "build-base: $*" >&2; }

# One build at a time: a second caller (CI builds it in the background while the tests that
# need it may ask for it too) waits, then finds the image.
exec 9>"/tmp/nbcluster-build-base.lock"
flock 9
if docker image inspect "$tag" >/dev/null 2>&1; then
  say "$tag exists"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
  say "debootstrap is not installed (deploy/docker/engine-up.sh installs it)"
  exit 1
}

root="$(mktemp -d /var/tmp/nbcluster-base.XXXXXX)"
# The tree holds device nodes and root-owned files: remove it whatever happens.
trap 'rm -rf --one-file-system "$root"' EXIT
started=$SECONDS
say "debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"
# What an image does not need: downloaded packages and package lists (apt-get update inside a
# derived image fetches them again), and the build host's resolver configuration.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
: >"$root/etc/resolv.conf"
tar --numeric-owner -C "$root" -c . |
  docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm (nbcluster deploy/docker/build-base.sh)" \
    - "$tag" >/dev/null
say "built $tag in $((SECONDS - started)) s ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
