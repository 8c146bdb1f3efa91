#!/usr/bin/env bash
# Build the CPU serving image from the Dockerfile with podman, run it, and check it as a user would.
#
#   make image-check                        # = nice -n 10 bash deploy/check-image.sh (as root)
#   BUNDLES=artifacts bash deploy/check-image.sh     # serve these bundles (default: a 4000-row demo model)
#   NO_CACHE=1 make image-check             # rebuild every layer
#
# Written for machines without a Docker engine whose only reachable hosts are package registries:
#   1. podman + runc + debootstrap (apt-get installs them when missing). crun fails here (setrlimit is not
#      permitted, hybrid cgroups); runc works once a scratch containers.conf sets the nofile/nproc ulimits to 8192.
#   2. The FROM image cannot be pulled: a Debian bookworm `debootstrap --variant=minbase` with python3.11, venv,
#      pip and ca-certificates stands in for it, imported with `podman import` under the Dockerfile's FROM name
#      (python:3.11-slim-bookworm is bookworm's Python 3.11 too), with this machine's CA certificates so that pip
#      inside the build reaches the package index as the host does. Made once, then reused.
#   3. `podman build --format docker` (the OCI format drops HEALTHCHECK) `--build-arg VARIANT=cpu` (podman 4.3
#      mis-resolves the ARG-chosen stage without it).
#   4. Runs the image with the bundles mounted read-only, published on 127.0.0.1 only; waits for the image's own
#      HEALTHCHECK (`podman healthcheck run`: there is no systemd to schedule it); scores the README's request;
#      checks /metrics, the user, that torch is absent; stops it with SIGTERM (exit 0 expected) and removes it.
# Prints the image size. Exit 0: every check passed. The GPU variant (nvidia/cuda base) cannot be built here.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/lma-ctr:cpu}
NAME=${IMAGE_CHECK_CONTAINER:-lma-image-check}
WORK=${IMAGE_CHECK_DIR:-/var/tmp/lma-image-check}
PYTHON=${PYTHON:-python3}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-240}
# The Dockerfile's FROM image of the CPU variant, as podman names a short name from docker.io.
FROM_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
LOCAL_BASE=docker.io/library/${FROM_IMAGE}

say() { printf 'image check: %s\n' "$*"; }
die() { printf 'image check: FAILED: %s\n' "$*" >&2; exit 1; }

# ---- 1. tools -----------------------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || die "needs root and ${missing[*]} (apt-get install podman runc debootstrap)"
  say "installing ${missing[*]} (apt-get)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >/dev/null
fi
mkdir -p "$WORK"
export CONTAINERS_CONF="$WORK/containers.conf"
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=8192:8192", "nproc=8192:8192"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

# ---- 2. the local stand-in for the FROM image ---------------------------------------------------------------
if podman image exists "$LOCAL_BASE"; then
  say "local base $LOCAL_BASE: present"
else
  say "local base $LOCAL_BASE: debootstrap bookworm (minbase + python3.11, venv, pip, ca-certificates)"
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $WORK/debootstrap.log"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
  say "local base $LOCAL_BASE: imported"
fi

# ---- 3. build -------------------------------------------------------------------------------------------------
say "building $IMAGE (podman build --format docker --build-arg VARIANT=cpu; log: $WORK/build.log)"
t0=$SECONDS
# NO_CACHE=1: rebuild every layer (the pip download cache of the Dockerfile's cache mount is kept)
podman build --format docker --build-arg VARIANT=cpu ${NO_CACHE:+--no-cache} -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; die "podman build failed: see $WORK/build.log"; }
size_mb=$(($(podman image inspect "$IMAGE" --format '{{.Size}}') / 1000000))
base_mb=$(($(podman image inspect "$LOCAL_BASE" --format '{{.Size}}') / 1000000))
say "image built in $((SECONDS - t0)) s: $IMAGE, $size_mb MB ($base_mb MB of it the base)"
healthcheck=$(podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck}}')
case "$healthcheck" in *v2/health/ready*) ;; *) die "the image has no HEALTHCHECK on /v2/health/ready: $healthcheck" ;; esac

# ---- 4. a bundle to serve ------------------------------------------------------------------------------------
if [ -n "${BUNDLES:-}" ]; then
  bundles=$(cd "$BUNDLES" && pwd)
else
  [ -x .venv/bin/lma ] || make setup
  rm -rf "$WORK/demo"
  say "building a demo bundle (make demo-build DEMO_ROWS=4000; log: $WORK/demo.log)"
  make demo-build DEMO_ROOT="$WORK/demo" DEMO_ROWS=4000 > "$WORK/demo.log" 2>&1 || die "demo build failed: see $WORK/demo.log"
  bundles="$WORK/demo/artifacts"
fi
chmod -R a+rX "$bundles"  # the image's user (uid 10001) reads them

# ---- 5. run and check -------------------------------------------------------------------------------------------
port=$($PYTHON -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
podman rm -f "$NAME" >/dev/null 2>&1 || true
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }  # whatever happens: no container is left
trap cleanup EXIT
# (podman says on stderr that it cannot schedule the healthcheck without systemd: run by hand below)
podman run -d --name "$NAME" -p "127.0.0.1:$port:8000" -v "$bundles:/models:ro" "$IMAGE" >/dev/null 2>"$WORK/run.log" \
  || { cat "$WORK/run.log" >&2; die "podman run failed"; }
say "container $NAME started, published on 127.0.0.1:$port"

deadline=$((SECONDS + HEALTH_TIMEOUT_S))
until podman healthcheck run "$NAME" >/dev/null 2>&1; do
  state=$(podman inspect "$NAME" --format '{{.State.Status}}')
  [ "$state" = running ] || { podman logs "$NAME" >&2 || true; die "the container stopped ($state) before it was healthy"; }
  ((SECONDS < deadline)) || { podman logs "$NAME" >&2 || true; die "not healthy within ${HEALTH_TIMEOUT_S} s"; }
  sleep 2
done
say "container healthy: $(podman inspect "$NAME" --format '{{.State.Health.Status}}') (podman healthcheck run)"

scored=$($PYTHON deploy/demo_request.py --score "$base") || die "the README's request was not scored"
say "row scored: $scored"

metrics=$(curl -sf "$base/metrics") || die "GET /metrics failed"
grep -q '^lma_model_compression_ratio{model="demo"} ' <<<"$metrics" || die "/metrics has no lma_model_compression_ratio of demo"
grep -q '^lma_requests_total{code="200",model="demo"' <<<"$metrics" || die "/metrics counts no answered request"
say "/metrics: $(grep '^lma_model_compression_ratio{' <<<"$metrics")"

uid=$(podman exec "$NAME" id -u)
[ "$uid" = 10001 ] || die "the server runs as uid $uid, expected 10001"
podman exec "$NAME" python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
  || die "torch is installed in the CPU image"
ort=$(podman exec "$NAME" python -c "import importlib.metadata as m; print(m.version('onnxruntime'))")
say "runs as uid $uid; torch absent; onnxruntime $ort"

podman stop -t 40 "$NAME" >/dev/null 2>>"$WORK/run.log"
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { podman logs "$NAME" >&2 || true; die "SIGTERM: exit code $code, expected 0"; }
podman rm "$NAME" >/dev/null 2>>"$WORK/run.log"
trap - EXIT
say "stopped with SIGTERM (exit 0) and removed"
say "passed: $IMAGE $size_mb MB (the image with torch and onnxruntime-gpu was 1720 MB)"
