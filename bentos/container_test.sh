#!/usr/bin/env bash
# `make container-test`: the bento's image built and run for real (docs/how-to/container.md).
#
#   1. `make bento` has built the bento; its generated Dockerfile (env/docker/Dockerfile) is built with
#      `docker build`, in a copy of the bento directory (the build context `bentoml containerize` uses);
#   2. the container runs with a copy of a data dir (a published release) mounted at /data, owned by the image's
#      non-root user, and BENTOML_HOME=/data/bentoml (the image's own is BentoML's /home/bentoml/); the test
#      waits for GET /readyz, asks POST /retrieve for the release's example user ("learned") and for an unknown
#      user ("cold_start"), checks the server runs as non-root, stops it.
#
# Reports the image size, the build time and the wall time. The image users build is the bento's Dockerfile as
# generated (FROM python:3.11-slim, or that image pinned by digest). What this script may change, and only in its
# own copy, for a machine that can't build that as is:
#   - BASE_IMAGE (default: the Dockerfile's, python:3.11-slim[@sha256:<digest>]) when it is neither present nor
#     pullable: a stand-in built from Debian bookworm packages (debootstrap; python3 is 3.11 there), tagged
#     $STANDIN_IMAGE, used in FROM instead;
#   - the CA bundle pip is configured with (`pip config list`: cert, or CT_CA_BUNDLE): added to the test's base
#     image and named in SSL_CERT_FILE / PIP_CERT, for a network that intercepts TLS;
#   - a local wheel for the pinned torch CPU build in pip's find-links folder (or CT_TORCH_WHEEL_DIR): served on
#     127.0.0.1 for the build and named in the `--find-links` line in place of the PyTorch CPU wheel page;
#   - the build runs with --network $CT_BUILD_NETWORK (default host: a build step reaches that server and the
#     host's network).
# None of it is in the bento, the bentofile or the requirements.
#
# Environment: CT_DATA (the data dir to serve; default: .data when `make run` left a live release there, else
# .data/container-test, where `retrieval run` makes one first: a whole pipeline run, several minutes),
# BENTOML_HOME (where `make bento` put the bento), BASE_IMAGE, CT_IMAGE (tag of the built image),
# CT_BUILD_ARGS (more `docker build` arguments, e.g. --no-cache), CT_READY_SECONDS (default 300),
# CT_KEEP=1 (keep the container and the data copy for a look).
set -Eeuo pipefail

started=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$REPO/.venv/bin}
: "${BENTOML_HOME:?BENTOML_HOME: the bento store of make bento}"
say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'container-test: FAILED: %s\n' "$*" >&2; exit 1; }
live_in() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("live") or "")' \
  "$1/releases/registry.json" 2>/dev/null || true; }
if [[ -z ${CT_DATA:-} ]]; then
  if [[ -n $(live_in "$REPO/.data") ]]; then
    CT_DATA=$REPO/.data
    say "serving a copy of the release make run left in .data ($(live_in "$CT_DATA"); CT_DATA=DIR serves another)"
  else
    CT_DATA=$REPO/.data/container-test
  fi
fi
mkdir -p "$CT_DATA" && CT_DATA=$(cd "$CT_DATA" && pwd)
STANDIN_IMAGE=${STANDIN_IMAGE:-retrieval-ct/debian-bookworm-python:3.11}
CT_BUILD_NETWORK=${CT_BUILD_NETWORK:-host}
CT_READY_SECONDS=${CT_READY_SECONDS:-300}
COLD_USER=987654321

command -v docker >/dev/null || die "docker is not installed (Debian: apt-get install docker.io, then start dockerd)"
docker info >/dev/null 2>&1 || die "no Docker daemon answers (start it: dockerd > /tmp/dockerd.log 2>&1 &)"

work=$(mktemp -d "${TMPDIR:-/tmp}/retrieval-ct.XXXXXX")
container="retrieval-ct-$$"
server_pid=""
cleanup() {
  local rc=$?
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  if [[ ${CT_KEEP:-0} == 1 ]]; then
    echo "container-test: kept container $container and $work (CT_KEEP=1)" >&2
  else
    docker rm -f "$container" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- the bento ---------------------------------------------------------------------------------------------------
version=$(cat "$BENTOML_HOME/bentos/retrieval/latest" 2>/dev/null) || die "no bento in $BENTOML_HOME (make bento)"
bento="$BENTOML_HOME/bentos/retrieval/$version"
image=${CT_IMAGE:-retrieval-container-test:$version}
ctx="$work/context"
cp -a "$bento" "$ctx"
dockerfile="$ctx/env/docker/Dockerfile"
requirements="$ctx/env/python/requirements.txt"
from_image=$(sed -n 's/^FROM \(.*\) AS base-container$/\1/p' "$dockerfile" | head -1)
[[ $from_image =~ ^python:3\.11-slim(@sha256:[0-9a-f]{64})?$ ]] \
  || die "the bento's Dockerfile is FROM '$from_image', not python:3.11-slim[@sha256:<digest>] (bentos/bentofile.yaml?)"
BASE_IMAGE=${BASE_IMAGE:-$from_image}

# --- the base image ----------------------------------------------------------------------------------------------
base=$BASE_IMAGE
if ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 120 docker pull -q "$base" >/dev/null 2>&1; then
  base=$STANDIN_IMAGE
  if docker image inspect "$base" >/dev/null 2>&1; then
    say "$BASE_IMAGE can't be pulled: using the Debian bookworm stand-in $base (built before)"
  else
    say "$BASE_IMAGE can't be pulled: building a stand-in from Debian bookworm packages ($base)"
    command -v debootstrap >/dev/null || die "no $BASE_IMAGE and no debootstrap (apt-get install debootstrap)"
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    rootfs="$work/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,passwd,ca-certificates bookworm "$rootfs" \
      > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap"; }
    # like python:3.11-slim: pip may install into the system python (uv, which the Dockerfile installs with pip)
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base" >/dev/null
    rm -rf "$rootfs"
  fi
fi

# this machine's CA bundle, when pip is set up with one: in the test's base image only
ca=${CT_CA_BUNDLE:-${PIP_CERT:-$("$BIN/pip" config get global.cert 2>/dev/null || true)}}
if [[ -n $ca && -f $ca ]]; then
  say "adding the CA bundle pip uses here ($ca) to the test's base image"
  mkdir "$work/base"
  cp "$ca" "$work/base/ca-bundle.crt"
  printf '%s\n' "FROM $base" "COPY ca-bundle.crt /etc/ssl/certs/container-test-ca-bundle.crt" \
    "ENV SSL_CERT_FILE=/etc/ssl/certs/container-test-ca-bundle.crt PIP_CERT=/etc/ssl/certs/container-test-ca-bundle.crt" \
    > "$work/base/Dockerfile"
  base_tag="retrieval-ct/base-with-ca:$(cat "$work/base/Dockerfile" "$work/base/ca-bundle.crt" | sha256sum | cut -c1-12)"
  DOCKER_BUILDKIT=0 docker build -q -t "$base_tag" "$work/base" >/dev/null
  base=$base_tag
fi
if [[ $base != "$from_image" ]]; then
  awk -v b="$base" '!done && /^FROM .* AS base-container$/ {print "FROM " b " AS base-container"; done = 1; next} 1' \
    "$dockerfile" > "$dockerfile.ct" && mv "$dockerfile.ct" "$dockerfile"
fi

# a local wheel of the pinned torch CPU build instead of the PyTorch wheel page, when there is one
torch_pin=$(grep -oE '^torch==[^ ;\\]+' "$requirements" | head -1 | cut -d= -f3)
[[ -n $torch_pin ]] || die "no torch==<version> in the bento's requirements"
wheel=""
for dir in ${CT_TORCH_WHEEL_DIR:-} ${PIP_FIND_LINKS:-} $("$BIN/pip" config get global.find-links 2>/dev/null || true); do
  [[ -d $dir ]] || continue
  wheel=$(ls "$dir"/torch-"$torch_pin"-cp311-cp311-*linux*_"$(uname -m)".whl 2>/dev/null | head -1) && [[ -n $wheel ]] && break
done
if [[ -n $wheel ]]; then
  mkdir "$work/links"
  ln -s "$wheel" "$work/links/"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 --directory "$work/links" "$port" > "$work/links.log" 2>&1 &
  server_pid=$!
  sed -i "s|^--find-links .*|--find-links http://127.0.0.1:$port/|" "$requirements"
  say "torch $torch_pin from the local wheel $(basename "$wheel") (served on 127.0.0.1:$port for the build)"
fi

# --- build -------------------------------------------------------------------------------------------------------
say "docker build $image (FROM $base, --network $CT_BUILD_NETWORK)"
build_start=$(date +%s)
# shellcheck disable=SC2086  # CT_BUILD_ARGS: more `docker build` arguments, e.g. --no-cache (a build time from scratch)
DOCKER_BUILDKIT=0 docker build --network "$CT_BUILD_NETWORK" ${CT_BUILD_ARGS:-} -t "$image" -f "$dockerfile" "$ctx" \
  > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "docker build (log above)"; }
build_seconds=$(( $(date +%s) - build_start ))
[[ -n $server_pid ]] && { kill "$server_pid" 2>/dev/null || true; server_pid=""; }
user=$(docker image inspect --format '{{.Config.User}}' "$image")
[[ -n $user && $user != root && $user != 0 ]] || die "the image runs as '${user:-root}', not as a non-root user"

# --- data --------------------------------------------------------------------------------------------------------
live() { live_in "$CT_DATA"; }
if [[ -z $(live) ]]; then
  say "no release in $CT_DATA: making one with the whole pipeline (retrieval run --data_dir $CT_DATA: generate, " \
      "build, features, train, publish; several minutes; \`make run\` first to reuse its release instead)"
  # its user towers go to the data dir's own model store ($CT_DATA/bentoml), not to the bento store of make bento
  BENTOML_HOME="$CT_DATA/bentoml" "$BIN/retrieval" run --data_dir "$CT_DATA"
  [[ -n $(live) ]] || die "retrieval run published no live release in $CT_DATA"
fi
# a copy of what the service reads: releases, user towers, snapshots (cold start), Feast, Milvus; not the raw data,
# the training set, checkpoints, reports or benchmark folders (nor a host service's pid and log)
mkdir "$work/data"
tar -C "$CT_DATA" --exclude=./raw --exclude=./training --exclude=./models --exclude=./pretrained --exclude=./reports \
  --exclude='./bench*' --exclude=./container-test --exclude=./dbt --exclude=./dev --exclude=./site --exclude=./stack \
  --exclude=./serve.pid --exclude='./serve.log*' -cf - . | tar -C "$work/data" -xf -
run_as=()
if [[ $(id -u) == 0 ]]; then
  uid=$(docker run --rm --entrypoint id "$image" -u)
  chown -R "$uid:$uid" "$work/data"   # the image's own user, as a volume owned by it in production
else
  run_as=(--user "$(id -u):$(id -g)")
fi

# --- run ---------------------------------------------------------------------------------------------------------
say "docker run $image with $CT_DATA (a copy) at /data"
run_start=$(date +%s)
# BENTOML_HOME: the image has BentoML's /home/bentoml/, the model store of the data dir is /data/bentoml
# (bentos/bentofile.yaml, envs); a run names it, as docs/how-to/container.md tells users to
docker run -d --name "$container" "${run_as[@]}" -p 127.0.0.1::3000 -e BENTOML_HOME=/data/bentoml \
  -v "$work/data:/data" "$image" >/dev/null
url="http://$(docker port "$container" 3000/tcp | head -1)"
deadline=$(( $(date +%s) + CT_READY_SECONDS ))
until ready=$(curl -sf "$url/readyz" 2>/dev/null); do
  if [[ $(docker inspect --format '{{.State.Running}}' "$container") != true ]]; then
    docker logs --tail 60 "$container" >&2; die "the container exited"
  fi
  (( $(date +%s) < deadline )) || { docker logs --tail 60 "$container" >&2; die "/readyz not 200 in ${CT_READY_SECONDS}s"; }
  sleep 2
done
ready_seconds=$(( $(date +%s) - run_start ))
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
release=$(json 'd["release"]["model_version"]' <<< "$ready")
user_id=$(json 'd["release"]["example_user_id"]' <<< "$ready")
[[ $user_id =~ ^[0-9]+$ ]] || die "/readyz names no example_user_id: $ready"
echo "ready: release $release, example user $user_id" >&2

retrieve() {
  curl -sf -X POST "$url/retrieve" -H 'Content-Type: application/json' -d "{\"user_id\": $1, \"k\": 10}" \
    || die "POST /retrieve user_id=$1"
}
learned=$(retrieve "$user_id")
[[ $(json 'd["retrieval"]' <<< "$learned") == learned ]] || die "user $user_id is not answered 'learned': $learned"
[[ $(json 'len(d["pins"])' <<< "$learned") == 10 ]] || die "not 10 pins: $learned"
[[ $(json 'd["model_version"]' <<< "$learned") == "$release" ]] || die "not the release of /readyz: $learned"
echo "learned: user $user_id -> $(json '[p["pin_id"] for p in d["pins"]]' <<< "$learned")" >&2
cold=$(retrieve "$COLD_USER")
[[ $(json 'd["retrieval"]' <<< "$cold") == cold_start ]] || die "user $COLD_USER is not answered 'cold_start': $cold"
[[ $(json 'len(d["pins"])' <<< "$cold") == 10 ]] || die "not 10 pins: $cold"
echo "cold start: user $COLD_USER -> $(json '[p["pin_id"] for p in d["pins"]]' <<< "$cold")" >&2

# non-root: the user of the image, of `docker exec`, and of every process in the container
exec_uid=$(docker exec "$container" id -u)
[[ $exec_uid != 0 ]] || die "the container runs as root"
proc_uids=$(docker exec "$container" sh -c 'for s in /proc/[0-9]*/status; do awk "/^Uid:/ {print \$2}" "$s"; done' \
  2>/dev/null | sort -u | tr '\n' ' ')
[[ -n $proc_uids && ! " $proc_uids " =~ " 0 " ]] || die "a process in the container runs as root (uids: $proc_uids)"
echo "non-root: image user $user, uid $exec_uid (processes: $proc_uids)" >&2

say "stop"
docker stop -t 20 "$container" >/dev/null
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$container")
[[ ${CT_KEEP:-0} == 1 ]] || docker rm "$container" >/dev/null

size=$(docker image inspect --format '{{.Size}}' "$image")
printf '\ncontainer-test: passed. image %s (FROM %s): %s MB (docker image ls: %s), build %ss, ready %ss after start,' \
  "$image" "$base" "$(( size / 1000000 ))" "$(docker image ls --format '{{.Size}}' "$image")" "$build_seconds" \
  "$ready_seconds"
printf ' stopped with exit code %s, wall time %ss\n' "$exit_code" "$(( $(date +%s) - started ))"
