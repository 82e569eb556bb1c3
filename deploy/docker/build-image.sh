#!/usr/bin/env bash
# Build the nbcluster image from this checkout (what `make image` runs).
#
#   deploy/docker/build-image.sh [--base IMAGE] [--extras LIST] [--tag TAG]... [--label KEY=VALUE]...
#
#   --base   the image to build FROM (default python:3.11-slim; nbcluster-base:bookworm on a
#            machine without a registry, made by deploy/docker/build-base.sh)
#   --extras nbcluster's extras to install too, comma-separated (`make image` gives
#            datascience: numpy, pandas, matplotlib, scipy, scikit-learn for the notebooks of
#            kernels that run in the image; default none, what the tests build)
#   --tag    default: nbcluster:<version> and nbcluster:latest
#   --label  extra image labels (tests/engine.py labels its images with a hash of the sources)
#
# PYTHON: the host interpreter that builds nbcluster's own (pure Python) wheel and whose pip
# configuration and installed versions the dependencies follow (default .venv/bin/python when
# it exists, else python3).
#
# How: the project's sources are copied to a staging directory and built into a wheel there
# (nothing is written into the checkout); its runtime dependencies are fetched as wheels by the
# base image's Python with the host's pip configuration (same indexes, certificates, cache),
# pinned to the versions the host's environment has; then `docker build` runs on that staging
# directory with deploy/docker/Dockerfile, offline. deploy/docker/README.md says why.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
base="python:3.11-slim"
extras=""
tags=()
labels=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base="$2"; shift 2 ;;
    --extras) extras="$2"; shift 2 ;;
    --tag) tags+=("$2"); shift 2 ;;
    --label) labels+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
say() { echo "build-image: $*" >&2; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
version="$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")"
if [ ${#tags[@]} -eq 0 ]; then tags=("nbcluster:$version" "nbcluster:latest"); fi

started=$SECONDS
if ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull --quiet "$base" >/dev/null; then
  say "no image $base (on a machine without a registry, deploy/docker/build-base.sh builds nbcluster-base:bookworm)"
  exit 1
fi

ctx="$(mktemp -d "${TMPDIR:-/tmp}/nbcluster-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/src" "$ctx/wheels/deps" "$ctx/wheels/project"

# The sources as they are now (tracked or not), without caches and build leftovers.
tar -C "$repo" -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
  pyproject.toml README.md src | tar -C "$ctx/src" -x
for f in "$repo"/LICENSE*; do if [ -e "$f" ]; then cp "$f" "$ctx/src/"; fi; done
# A fixed timestamp makes the wheel a function of the sources alone, so that an unchanged
# checkout reuses the image's cached layers.
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --no-deps -w "$ctx/wheels/project" "$ctx/src"

# Pin the dependencies to the host environment's versions when it has them (the versions the
# tests ran with); direct references and nbcluster itself cannot be constraints.
"$python" -m pip freeze --exclude-editable 2>/dev/null |
  grep -v -e ' @ ' -e '^nbcluster[=<> ]' -e '^-e ' >"$ctx/constraints.txt" || true

# The dependencies are resolved by the base image's own Python, not the host's: environment
# markers (`python_full_version < "3.11.3"`) depend on the exact interpreter, and Debian's
# 3.11.2 needs wheels that a newer host Python would skip. It runs in a throwaway container on
# the host's network with the host's effective pip configuration (indexes, find-links,
# certificates, constraints) as PIP_* variables, in a file rather than on a command line (an
# index URL may hold a password), and every local path that configuration names (a file://
# index with the folder around it) mounted read-only at the same place; the host's pip cache
# makes it quick.
pip_args=(--env-file "$ctx/pip.env")
while IFS= read -r -d '' arg; do pip_args+=("$arg"); done < <(
  "$python" -m pip config list 2>/dev/null | "$python" -c '
import os, shlex, sys
env, paths = {}, set()
for line in sys.stdin:
    key, sep, value = line.strip().partition("=")
    section, _, name = key.partition(".")
    if not sep or section not in {"global", "wheel", ":env:"}:
        continue
    value = " ".join(shlex.split(value))
    env["PIP_" + name.upper().replace("-", "_")] = value
    for part in value.split():
        path = part.removeprefix("file://").rstrip("/")
        if path.startswith("/") and os.path.exists(path):
            path = os.path.realpath(path)
            # A local "simple" index links to its files beside it (../../files/...).
            paths.add(os.path.dirname(path) if part.startswith("file://") else path)
with open(sys.argv[1], "w") as f:
    f.writelines(f"{name}={value}\n" for name, value in sorted(env.items()))
sys.stdout.write("".join(f"--volume\0{p}:{p}:ro\0" for p in sorted(paths)))
' "$ctx/pip.env"
)
cache="$("$python" -m pip cache dir 2>/dev/null || true)"
if [ -n "$cache" ] && mkdir -p "$cache" 2>/dev/null; then
  pip_args+=(--volume "$cache:/pip-cache" --env PIP_CACHE_DIR=/pip-cache)
fi
# The host's own pip (pure Python, vendoring what it needs) runs there too: the base's pip may
# be older (Debian's 23.0) and then neither reads the host's cache nor resolves as fast.
host_pip="$("$python" -c 'import os, pip; print(os.path.dirname(pip.__file__))' 2>/dev/null || true)"
if [ -n "$host_pip" ] && [ -f "$host_pip/__main__.py" ]; then
  pip_args+=(--volume "$host_pip:/opt/host-pip/pip:ro" --env PYTHONPATH=/opt/host-pip)
fi
project_wheel="$(cd "$ctx/wheels/project" && ls nbcluster-*.whl)"
if [ -n "$extras" ]; then
  if ! [[ "$extras" =~ ^[a-z0-9,-]+$ ]]; then say "--extras $extras: not a list of extra names"; exit 2; fi
  project_wheel="$project_wheel[$extras]"
fi
# Its output is shown only when it fails: pip warns about every project a local index lacks.
if ! docker run --rm --network host --user "$(id -u):$(id -g)" --env HOME=/tmp \
  --volume "$ctx:/ctx" "${pip_args[@]}" --entrypoint python3 "$base" \
  -m pip wheel --quiet --disable-pip-version-check -c /ctx/constraints.txt \
  -w /ctx/wheels/deps "/ctx/wheels/project/$project_wheel" >"$ctx/pip.log" 2>&1; then
  grep -v '^WARNING: Location .* is ignored' "$ctx/pip.log" >&2 || true
  say "fetching the dependencies as wheels in $base failed (above)"
  exit 1
fi
rm -f "$ctx"/wheels/deps/nbcluster-*.whl
say "wheels ready in $((SECONDS - started)) s ($(ls "$ctx/wheels/deps" | wc -l) dependencies)"

cp "$repo/deploy/docker/Dockerfile" "$ctx/Dockerfile"
args=(--build-arg "BASE=$base" --build-arg "VERSION=$version")
for t in "${tags[@]}"; do args+=(--tag "$t"); done
for l in "${labels[@]}"; do args+=(--label "$l"); done
build_started=$SECONDS
docker build --quiet "${args[@]}" "$ctx" >/dev/null
# Each build after a change leaves the previous images untagged (the engine keeps them as its
# cache): remove those more than a day old, so that a developer's disk does not fill.
for label in nbcluster.build-stage org.opencontainers.image.title=nbcluster; do
  docker image prune --force --filter "label=$label" --filter until=24h >/dev/null || true
done
size="$(docker image inspect --format '{{.Size}}' "${tags[0]}" | awk '{printf "%.0f MB", $1/1e6}')"
say "built ${tags[*]} FROM $base in $((SECONDS - build_started)) s (total $((SECONDS - started)) s, $size)"
