# One image for every component; the manifests pick one with the arguments:
#   flowmap operator run | flowmap agent run | flowmap dp run ...
# Build: docker build -t flowmap:dev .   (hack/kind-e2e.sh builds, loads and installs it)
#
# The base is pinned by tag and digest (the multi-platform index of python:3.11.13-slim-bookworm):
# a rebuild gets the same Python and Debian, and a bump is a reviewed change of this line.
ARG BASE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

# Build stage: the project and its dependencies in a virtualenv. The dependencies come from
# wheels; flowmap itself is built here, its extension flowmap_dp._native (dp/native) by cargo.
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Rust from Debian (dp/native/debian-packages.txt: rustc-web and cargo-web, which bring gcc and
# libc6-dev; the newest from bookworm-security): in this stage only, before the sources so that
# an edit does not fetch it again.
COPY dp/native/debian-packages.txt /tmp/rust-packages.txt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      $(grep -v '^#' /tmp/rust-packages.txt) \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv --without-pip /opt/flowmap
WORKDIR /src
# .dockerignore lets in only these: no tests, captures, .git or local virtualenv.
COPY pyproject.toml README.md LICENSE ./
COPY api api
COPY cli cli
COPY devenv devenv
COPY dp dp
COPY node-agent node-agent
COPY operator operator
# The base image's pip installs into the virtualenv, so pip itself stays out of the image. Not
# editable, and byte-compiled here: the containers' root filesystems are read-only. Every
# dependency, and setuptools-rust for the build, from a wheel; flowmap from this folder, its crates
# exactly as dp/native/Cargo.lock has them (cargo fetch --locked fails on a stale lock file).
# Behind a proxy with its own certificate authority, pass the CA bundle (pip's and cargo's) for
# this step only:
#   --secret id=build-ca,src=/etc/ssl/certs/ca-certificates.crt
# A secret is mounted for the one RUN and is never part of a layer.
RUN --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then \
      export PIP_CERT=/run/secrets/build-ca CARGO_HTTP_CAINFO=/run/secrets/build-ca; \
    fi; \
    cargo fetch --locked --manifest-path dp/native/Cargo.toml \
 && pip --python /opt/flowmap/bin/python install --only-binary=:all: --no-binary=flowmap .

# Runtime stage: the virtualenv (the extension is one shared library in it: no Rust here) and the
# one Debian tool a component runs.
FROM ${BASE}
# nftables: the agent's Protect mode programs the node with `nft`. Not here: tcpdump (the dp
# needs it only to compile a --filter expression, which the DaemonSet does not use) and iproute2
# (the agent reads links and routes over netlink; `ip netns` is for the simulated cluster).
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/flowmap /opt/flowmap
ENV PATH=/opt/flowmap/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title=flowmap \
      org.opencontainers.image.description="Learns a Kubernetes cluster's network topology from its packets" \
      org.opencontainers.image.licenses=Apache-2.0
# Non-root by default: the operator runs as this user. The DaemonSet runs the agent and the dp
# as root holding one capability each (manifests/agent/daemonset.yaml says why).
USER 65532:65532
ENTRYPOINT ["/opt/flowmap/bin/flowmap"]
CMD ["--help"]
