#!/bin/sh
# The host daemon of deploy/swarm/stack.yml, one per GPU node (the stack mounts this file as
# a Docker config and runs it with /bin/sh). What a stack file cannot compute, done here:
#
#   --name     $NBCLUSTER_HOST_NAME (the stack sets the node's hostname), else the hostname
#   --address  $NBCLUSTER_HOST_ADDRESS, else this node's address on the route to the gateway:
#              with host networking the replicas listen on the node's address, and the one the
#              node reaches the gateway from is one the gateway can reach back
#   --gpus     $NBCLUSTER_HOST_GPUS virtual GPUs when set; else the real ones (NVML)
#
# The join token comes from the Docker secret, never from the command line. Extra arguments
# (the service's command) go to `nbcluster host` as they are.
set -eu

gateway="${NBCLUSTER_GATEWAY:?set NBCLUSTER_GATEWAY to the gateway URL hosts reach}"
name="${NBCLUSTER_HOST_NAME:-$(hostname)}"
address="${NBCLUSTER_HOST_ADDRESS:-}"
if [ -z "$address" ]; then
  address="$(python3 - "$gateway" <<'PY'
import socket
import sys
from urllib.parse import urlsplit

url = urlsplit(sys.argv[1])
family = socket.AF_INET6 if ":" in (url.hostname or "") else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as s:  # no packet is sent
    s.connect((url.hostname, url.port or (443 if url.scheme == "https" else 80)))
    print(s.getsockname()[0])
PY
)"
fi
set -- --gateway "$gateway" --name "$name" --address "$address" \
  --join-token-file /run/secrets/nbcluster-join-token "$@"
if [ -n "${NBCLUSTER_HOST_GPUS:-}" ]; then
  set -- "$@" --gpus "$NBCLUSTER_HOST_GPUS"
fi
echo "nbcluster host $name: address $address, gateway $gateway" >&2
exec nbcluster host "$@"
