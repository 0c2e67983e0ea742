# The README's two commands: `make demo` and `make test`. Both set up what is missing first:
# Debian packages and a Rust toolchain, a virtualenv with flowmap (its compiled extension built
# from dp/native) and its test tools, the cluster's binaries and images.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.flowmap-installed
FLOWMAP := $(VENV)/bin/flowmap
PYTEST_ARGS ?=
# What flowmap_dp._native is built from, the files dp/native/build.rs digests: an edit rebuilds it.
NATIVE := dp/native/Cargo.toml dp/native/Cargo.lock dp/native/build.rs $(shell find dp/native/src -type f)

.PHONY: demo test setup debs controlplane cluster vm proto docs clean

demo: setup
	$(FLOWMAP) demo

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

setup: debs $(STAMP) controlplane cluster vm

debs:
	@hack/install-debian-packages.sh hack/debian-packages.txt
	@hack/install-rust.sh

# A new pyproject.toml (or no virtualenv yet): install everything. Only the Rust sources changed:
# rebuild flowmap alone, its dependencies as they are (about 15 s).
$(STAMP): pyproject.toml $(NATIVE)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(if $(filter pyproject.toml,$?),\
	  $(VENV)/bin/pip install --quiet --upgrade pip && $(VENV)/bin/pip install --quiet -e '.[test]',\
	  $(VENV)/bin/pip install --quiet --no-deps -e .)
	@touch $@

# Built once from the official Go modules into ~/.cache/flowmap (or FLOWMAP_CONTROLPLANE_BIN).
controlplane: $(STAMP)
	@$(FLOWMAP) controlplane build >/dev/null

# The local cluster's programs (kubelet, kube-proxy, the controllers, CoreDNS, flannel, crictl)
# and images (a Debian base, flowmap's from the Dockerfile, pause, CoreDNS, flannel, the shop's),
# built once into ~/.cache/flowmap; flowmap's image again whenever the tree changed.
cluster: $(STAMP)
	@$(FLOWMAP) cluster build >/dev/null

# The VM tests' kernel (Debian's) and busybox initramfs, built once into ~/.cache/flowmap/vm,
# and whether KVM boots it here (TCG otherwise).
vm: $(STAMP)
	@$(VENV)/bin/python -m flowmap_devenv.vmimage >/dev/null

# Regenerate the committed protobuf code after editing a .proto (tests/test_generated.py checks).
proto: $(STAMP)
	$(VENV)/bin/python hack/generate_protos.py

# Regenerate docs/crd-reference.md after editing a CRD (tests/test_generated.py checks).
docs: $(STAMP)
	$(VENV)/bin/python hack/crd_reference.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache dp/native/target dp/flowmap_dp/_native*.so
