#!/usr/bin/env bash
# Make a Docker engine and a one-node Swarm available on this machine (as root), idempotently
# and without prompts: what the container tests and a developer trying the images need.
#
#   deploy/docker/engine-up.sh            # install if absent, start if not answering, swarm init
#
# * Installs Debian's docker.io (the 20.10 engine; the docker CLI already on PATH may be newer,
#   which is fine: it negotiates the API version down) and debootstrap (deploy/docker/
#   build-base.sh) when they are absent (deploy/apt-install.sh: `apt-get update` only if the
#   install fails without it).
# * Starts dockerd in the background with --iptables=false unless `docker info` already
#   answers: with its iptables rules dockerd sets the FORWARD policy to DROP, and with
#   br_netfilter loaded that drops the traffic of every Linux bridge, including the ones the
#   partition tests build between network namespaces. Containers here use host networking
#   (or a network a test creates), which needs no NAT rule.
# * Waits (bounded) for `docker info`, then `docker swarm init --advertise-addr 127.0.0.1` if
#   the node is not in a swarm yet.
#
# Environment: NBCLUSTER_DOCKERD_LOG (default /var/log/nbcluster-dockerd.log),
# NBCLUSTER_DOCKER_WAIT (seconds to wait for the engine, default 60).
set -euo pipefail

log_file="${NBCLUSTER_DOCKERD_LOG:-/var/log/nbcluster-dockerd.log}"
wait_s="${NBCLUSTER_DOCKER_WAIT:-60}"
say() { echo "engine-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  # Without root neither apt-get nor dockerd can run; an engine someone else started is fine.
  if docker info >/dev/null 2>&1; then
    say "not root, but an engine answers: using it"
    exit 0
  fi
  say "needs root to install and start the Docker engine"
  exit 1
fi

# One run at a time (CI and a developer, or two test sessions, may call it together).
exec 9>/tmp/nbcluster-engine-up.lock
flock 9

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  bash "$(dirname "${BASH_SOURCE[0]}")/../apt-install.sh" "${missing[@]}"
fi

if docker info >/dev/null 2>&1; then
  say "engine already answers"
else
  # Only start one if no dockerd runs (one may be starting, from Debian's init script or a
  # concurrent run of this script): else wait for it. A killed dockerd can linger as a zombie
  # until it is reaped, and does not count.
  live=""
  for pid in $(pgrep -x dockerd || true); do
    if [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then live=$pid; fi
  done
  if [ -z "$live" ]; then
    say "starting dockerd (log: $log_file)"
    mkdir -p "$(dirname "$log_file")"
    # In a session of its own (setsid), so that it outlives whatever called this script and
    # a signal to the caller's process group (a timeout, a job control stop) does not reach
    # it. containerd is started by dockerd itself, as its child.
    # 9>&-: dockerd must not inherit the lock, or it would hold it for its life.
    setsid dockerd --iptables=false --ip-masq=false >>"$log_file" 2>&1 </dev/null 9>&- &
    disown || true
  fi
  deadline=$((SECONDS + wait_s))
  until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      say "the engine did not answer within ${wait_s} s; the end of $log_file:"
      tail -n 30 "$log_file" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  say "engine up"
fi

# An engine started by someone else may have its iptables rules: say what that breaks.
if iptables -S FORWARD 2>/dev/null | grep -q -- '-P FORWARD DROP'; then
  say "warning: the iptables FORWARD policy is DROP (a dockerd started without" \
    "--iptables=false?): packets across Linux bridges between network namespaces are dropped" \
    "where br_netfilter is loaded, and the partition tests fail"
fi

swarm_state="$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || true)"
if [ "$swarm_state" != "active" ]; then
  say "initialising a one-node swarm (was: ${swarm_state:-unknown})"
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
fi
docker version --format 'engine-up: client {{.Client.Version}}, server {{.Server.Version}} (API {{.Server.APIVersion}})' >&2
