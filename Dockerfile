# bb-worker production image, linux/amd64 (the platform Cloudflare Containers and most clusters run).
#
#   docker build --platform linux/amd64 -t bb-worker .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp bb-worker
#
# Dockerfile.dev is this file without the --platform pins (native arch, e.g. arm64
# on Apple Silicon); tests/test_image.py checks that the two stay in step, lints
# both with hadolint, and assembles the runtime stage below into a directory to
# prove a witness from it (non-root, read-only, no shell, empty PATH).
# deploy/README.md explains the build args and the CRS sizes.

# Base images, pinned by digest (multi-arch index digests). Where they come from:
# the same tag@digest pairs are pinned by Renovate in public Dockerfiles (e.g.
# retailnext/pproxy for distroless). Refresh with
#   docker buildx imagetools inspect node:20-bookworm-slim
#   docker buildx imagetools inspect gcr.io/distroless/python3-debian12:nonroot
# Both are Debian 12 (bookworm, glibc 2.36); Debian's python3 in the build stage
# is the very Python 3.11 that distroless ships, so wheels and the VK match.
ARG BUILD_IMAGE=node:20-bookworm-slim@sha256:2cf067cfed83d5ea958367df9f966191a942351a2df77d6f0193e162b5febfc0
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot@sha256:7d1042ce588ab97019fe95c24ffca7bc5a82ccdac572511d5e09bda4435c89c5

# ---------------------------------------------------------------- build stage
# node image: npm for scripts/install_bb.py (npm pack @aztec/bb.js), plus Debian's python3.
# DL3029 (no --platform on FROM) ignored: this image is amd64-only by design, on any
# build machine; both stages are pinned so bb, the wheels and the VK are amd64's.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${BUILD_IMAGE} AS build
# DL3008 (pin apt versions) ignored: the base is pinned by digest and bookworm only
# takes fixes; Debian drops superseded versions from its mirrors and binNMU suffixes
# differ between amd64 and arm64, so exact pins would break the build, not secure it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
ENV OUT=/out PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# 1. Python dependencies: the pinned requirements, into a plain directory (PYTHONPATH at run time).
COPY requirements.txt ./
RUN python3 -m pip install --no-cache-dir --target "$OUT/site-packages" -r requirements.txt

# 2. bb, fetched the way `make setup` does (npm pack @aztec/bb.js; arch of this build platform).
COPY scripts/install_bb.py scripts/
RUN python3 scripts/install_bb.py --dest "$OUT/bin/bb"

# 3. The CRS the circuit needs. Put bn254_g1.dat/bn254_g2.dat in deploy/crs/ to build
#    offline; bb downloads and checks whatever is missing. CRS_POINTS: G1 points to
#    bake in (0: what this circuit needs, 2^k + 1 for 2^k rows; more lets a bigger
#    circuit be mounted later).
ARG CRS_POINTS=0
ARG VERIFIER_TARGET=""
COPY scripts/precompute_vk.py scripts/
COPY circuit.json ./
COPY deploy/crs/ ${OUT}/crs/
RUN python3 scripts/precompute_vk.py crs --bb "$OUT/bin/bb" --circuit circuit.json --crs "$OUT/crs" --points "$CRS_POINTS" --target "$VERIFIER_TARGET"

# 4. The VK, computed by the app's own code so the server finds it under the same key.
COPY settings.py bbrunner.py ./
ENV PYTHONPATH=${OUT}/site-packages CIRCUIT_PATH=circuit.json BB_BINARY=${OUT}/bin/bb \
    BB_CRS_PATH=${OUT}/crs VK_CACHE_DIR=${OUT}/vk VERIFIER_TARGET=${VERIFIER_TARGET}
RUN python3 scripts/precompute_vk.py

# ---------------------------------------------------------------- runtime stage
# distroless: no shell, no package manager; user nonroot (65532). Only the app,
# its site-packages, bb, circuit.json, the VK and the CRS are added; nothing in
# /app is written at run time (the server writes only to $TMPDIR and /dev/shm).
# DL3029 ignored as above.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 ${RUNTIME_IMAGE}
ARG VERIFIER_TARGET=""
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
COPY --from=build /src/circuit.json /app/circuit.json
COPY --from=build /out/vk /app/vk
# The app: gunicorn.conf.py and the modules it and app.py import (the top-level *.py files).
COPY *.py /app/
# The OpenAPI document app.py serves at /api/openapi.json.
COPY openapi.json /app/
USER 65532:65532
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["/usr/bin/python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/health' % os.environ.get('PORT', '8080'), timeout=4)"]
ENTRYPOINT ["/usr/bin/python3"]
CMD ["-m", "gunicorn", "-c", "/app/gunicorn.conf.py"]
