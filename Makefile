# bb-worker: `make run` (set-up + server on :8080) and `make test` (set-up + all tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_CRS ?= ../shared/crs

# `make run` on a machine without internet: use a writable copy of the shared CRS
# (circuits up to 2^15 rows) unless BB_CRS_PATH is given. Elsewhere bb uses ~/.bb-crs.
ifeq ($(origin BB_CRS_PATH),undefined)
ifneq ($(wildcard $(SHARED_CRS)/bn254_g1.dat),)
RUN_CRS := $(CURDIR)/.crs
endif
endif

.PHONY: setup browser run test image-test bench bench-quick fixtures clean

# The pinned dependencies, then this checkout on the venv's path (a .pth line, what an editable
# install writes, without building anything): `import bbworker` from anywhere in the venv. The
# stamp is named by the requirements' content, not their times: a checkout mounted into the
# development image (Dockerfile.dev writes the same stamp) finds its venv installed.
INSTALLED := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
$(INSTALLED):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/bb-worker.pth"
	touch $@

setup: $(INSTALLED)
	$(PY) scripts/install_bb.py

run: setup
ifdef RUN_CRS
	mkdir -p $(RUN_CRS) && [ -f $(RUN_CRS)/bn254_g1.dat ] || { cp $(SHARED_CRS)/bn254_g1.dat $(SHARED_CRS)/bn254_g2.dat $(RUN_CRS)/ && chmod u+w $(RUN_CRS)/*; }
	BB_CRS_PATH=$(RUN_CRS) $(VENV)/bin/gunicorn -c gunicorn.conf.py
else
	$(VENV)/bin/gunicorn -c gunicorn.conf.py
endif

# The browser tests need Debian's chromium (CI runs as root on a fresh machine); if it
# cannot be installed, `make test` fails rather than skipping them.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The production image for each of IMAGE_ARCHES, built with buildah from the Dockerfile on
# bases made from Debian's packages (cached in /var/cache/bb-worker-images), and Dockerfile.dev's
# for this machine; each run plainly (`docker run -p 8080:8080 <image>`) and proving, the production
# ones as production runs them too, the developer one running `make test` on the mounted checkout
# (tests/packaging/image_engine.py). Needs root on Debian 12: it apt-installs podman, buildah,
# mmdebstrap and qemu-user-static if missing. deploy/README.md has the details.
IMAGE_ARCHES ?= amd64 arm64
IMAGE_TAG ?= localhost/bb-worker:test
image-test: setup
	$(PY) scripts/build_image.py $(foreach arch,$(IMAGE_ARCHES),--arch $(arch)) --dev --tag $(IMAGE_TAG)
	IMAGE_ARCHES="$(IMAGE_ARCHES)" IMAGE_TAG="$(IMAGE_TAG)" $(PY) -m pytest -p no:cacheprovider -v -s tests/packaging/image_engine.py

# Benchmark (bench/README.md): `make bench` is the full run (~17 min; needs Node.js + npm to
# generate the big circuits) and rewrites bench/RESULTS.md; `make bench-quick` (~2 min, committed
# circuits only, results in bench/out/quick/) is what CI runs. BENCH_ARGS passes options through.
bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) -m bench --quick $(BENCH_ARGS)

# Regenerate circuit.json and tests/fixtures/ with the pinned Noir toolchain (needs Node.js + npm).
fixtures:
	cd tools/noir && npm ci --no-audit --no-fund --silent
	node tools/noir/fixtures.mjs

clean:
	rm -rf $(VENV) .bb .crs .pytest_cache tools/noir/node_modules
