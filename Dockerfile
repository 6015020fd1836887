# bb-worker production image, for linux/amd64 or linux/arm64 (one file for both).
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t bb-worker .
#   podman build --platform linux/arm64 -t bb-worker:arm64 .     # or buildah bud
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp bb-worker
#
# The build stage runs on the build machine's own platform ($BUILDPLATFORM) and
# fetches what the target needs ($TARGETARCH: the wheels, bb); the VK stage runs
# the image's own Python and bb for the target (under QEMU emulation when the build
# machine's arch differs: a few seconds). `make image-test` builds and runs both
# (deploy/README.md#how-the-images-are-checked).

# Base images, pinned by digest (multi-arch index digests). Where they come from:
# the same tag@digest pairs are pinned by Renovate in public Dockerfiles (e.g.
# retailnext/pproxy for distroless). Refresh with
#   docker buildx imagetools inspect node:20-bookworm-slim
#   docker buildx imagetools inspect gcr.io/distroless/python3-debian12:nonroot
# Both are Debian 12 (bookworm, glibc 2.36); Debian's python3 in the build stage
# is the very Python 3.11 that distroless ships, so wheels and the VK match.
# make image-test passes bases made from Debian's packages (scripts/base_images.py).
ARG BUILD_IMAGE=node:20-bookworm-slim@sha256:2cf067cfed83d5ea958367df9f966191a942351a2df77d6f0193e162b5febfc0
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot@sha256:7d1042ce588ab97019fe95c24ffca7bc5a82ccdac572511d5e09bda4435c89c5

# ---------------------------------------------------------------- build stage
# node image: npm for scripts/install_bb.py (npm pack @aztec/bb.js), plus Debian's python3.
FROM --platform=$BUILDPLATFORM ${BUILD_IMAGE} AS build
# DL3008 (pin apt versions) ignored: the base is pinned by digest and bookworm only
# takes fixes; Debian drops superseded versions from its mirrors and binNMU suffixes
# differ between amd64 and arm64, so exact pins would break the build, not secure it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
ENV OUT=/out PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Set by BuildKit, buildah and podman: amd64 or arm64.
ARG TARGETARCH

# 1. Python dependencies: the pinned requirements, into a plain directory (PYTHONPATH at run
#    time): CPython 3.11 wheels for the target's arch and glibc 2.36 (Debian 12), never built.
COPY requirements.txt ./
RUN case "$TARGETARCH" in amd64) machine=x86_64 ;; arm64) machine=aarch64 ;; \
      *) echo "TARGETARCH='$TARGETARCH': build with --platform linux/amd64 or linux/arm64" >&2; exit 1 ;; esac \
 && PIP_PLATFORM="$(seq -f "manylinux_2_%g_$machine" 17 36)" python3 -m pip install --no-cache-dir \
      --only-binary=:all: --implementation cp --python-version 3.11 --target "$OUT/site-packages" -r requirements.txt

# 2. bb, fetched the way `make setup` does (npm pack @aztec/bb.js): the target's bb into
#    the image, and the build machine's bb for step 3.
ARG BB_VERSION=5.0.0
COPY scripts/install_bb.py scripts/
RUN python3 scripts/install_bb.py --version "$BB_VERSION" --arch "$TARGETARCH" --dest "$OUT/bin/bb" \
 && python3 scripts/install_bb.py --version "$BB_VERSION" --dest /opt/build-bb/bb \
 && rm -rf /root/.npm

# 3. The CRS the circuit needs. Put bn254_g1.dat/bn254_g2.dat in deploy/crs/ to build
#    offline; bb downloads and checks whatever is missing. CRS_POINTS: G1 points to
#    bake in (0: what this circuit needs, 2^k + 1 for 2^k rows; more lets a bigger
#    circuit be mounted later).
ARG CRS_POINTS=0
ARG VERIFIER_TARGET=""
COPY scripts/precompute_vk.py scripts/
COPY circuit.json ./
COPY deploy/crs/ ${OUT}/crs/
RUN python3 scripts/precompute_vk.py crs --bb /opt/build-bb/bb --circuit circuit.json --crs "$OUT/crs" --points "$CRS_POINTS" --target "$VERIFIER_TARGET"

# ---------------------------------------------------------------- VK stage
# 4. The VK, computed by the app's own code with the image's own Python and bb, so the
#    server finds it under the same key (circuit, `bb --version`, verifier target; each
#    arch's bb reports its own version string). The runtime base has no shell: exec-form
#    RUN. A cross build runs this step under emulation (QEMU binfmt_misc, as for any
#    multi-platform build that runs a command for the target).
# DL3065 (--platform=$TARGETPLATFORM is the default) ignored: buildah 1.28 (Debian 12)
# would look the base up for the build stage's platform instead.
# hadolint ignore=DL3065
FROM --platform=$TARGETPLATFORM ${RUNTIME_IMAGE} AS vk
ARG VERIFIER_TARGET=""
COPY --from=build --chown=65532:65532 /out /out
COPY circuit.json /src/
COPY bbworker/ /src/bbworker/
COPY scripts/precompute_vk.py /src/scripts/
ENV PYTHONPATH=/out/site-packages:/src CIRCUIT_PATH=/src/circuit.json BB_BINARY=/out/bin/bb \
    BB_CRS_PATH=/out/crs VK_CACHE_DIR=/out/vk VERIFIER_TARGET=${VERIFIER_TARGET} TMPDIR=/tmp
RUN ["/usr/bin/python3", "/src/scripts/precompute_vk.py"]

# ---------------------------------------------------------------- runtime stage
# distroless: no shell, no package manager; user nonroot (65532). Only the app,
# its site-packages, bb, circuit.json, the VK and the CRS are added; nothing in
# /app is written at run time (the server writes only to $TMPDIR and /dev/shm).
# DL3065 ignored as above.
# hadolint ignore=DL3065
FROM --platform=$TARGETPLATFORM ${RUNTIME_IMAGE}
ARG VERIFIER_TARGET=""
ARG BB_VERSION=5.0.0
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="bb-worker" \
      org.opencontainers.image.description="HTTP service that proves Noir witnesses with Barretenberg (bb)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      bb-worker.bb.version="${BB_VERSION}"
ENV PORT=8080 \
    TMPDIR=/tmp \
    CIRCUIT_PATH=/app/circuit.json \
    BB_BINARY=/app/bin/bb \
    BB_CRS_PATH=/app/crs \
    VK_CACHE_DIR=/app/vk \
    VERIFIER_TARGET=${VERIFIER_TARGET} \
    PYTHONPATH=/app/site-packages \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
# Least often changed first: dependencies, bb, CRS, circuit + VK, then the app's code.
COPY --from=build /out/site-packages /app/site-packages
COPY --from=build /out/bin/bb /app/bin/bb
COPY --from=build /out/crs /app/crs
COPY circuit.json /app/circuit.json
COPY --from=vk --chown=0:0 /out/vk /app/vk
# The app: the package (its OpenAPI document included) and the two entry points.
COPY bbworker/ /app/bbworker/
COPY app.py gunicorn.conf.py /app/
USER 65532:65532
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["/usr/bin/python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/health' % os.environ.get('PORT', '8080'), timeout=4)"]
ENTRYPOINT ["/usr/bin/python3"]
CMD ["-m", "gunicorn", "-c", "/app/gunicorn.conf.py"]
