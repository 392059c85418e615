# The tendril image: tendril-keeper, tendril-sentinel, tendril-proxy and tendrilctl with
# PostgreSQL 15, run as uid and gid 10001 (the user `tendrilctl k8s manifests` sets). Build
# it from the repository root and push it where your nodes pull from:
#
#   docker build -t registry.example/tendril:0.1.0 .
#   docker push registry.example/tendril:0.1.0
#
# The BPF programs are compiled against the build host's kernel BTF
# (/sys/kernel/btf/vmlinux). Without it (or with --build-arg TENDRIL_EBPF_SKIP=1) they are
# left out: the proxy pods forward in userspace anyway, which is what the manifests choose.

# The toolchain of rust-toolchain.toml.
FROM rust:1.95.0-bookworm AS build
# What the build uses (cargo xtask deps installs the same for development): protoc for the
# etcd client, clang and bpftool for the BPF programs, libbpf-sys's C build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential make pkg-config protobuf-compiler libprotobuf-dev \
      clang-19 bpftool libbpf-dev libelf-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
ARG TENDRIL_EBPF_SKIP
WORKDIR /src
COPY . .
RUN if [ -z "$TENDRIL_EBPF_SKIP" ]; then unset TENDRIL_EBPF_SKIP; fi \
 && cargo build --release --locked --bins \
      -p tendril-keeper -p tendril-sentinel -p tendril-proxy -p tendril-control \
 && mkdir /out \
 && cp target/release/tendril-keeper target/release/tendril-sentinel \
       target/release/tendril-proxy target/release/tendrilctl /out/

FROM debian:12-slim
# PostgreSQL 15 in /usr/lib/postgresql/15/bin, the keeper's default --pg-bin-path. The
# Debian package's own cluster is not used: each keeper owns its data directory.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 tendril \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/tendril \
      --shell /usr/sbin/nologin tendril
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# The manifests name the command of each container; this is for `docker run IMAGE --help`.
CMD ["tendrilctl", "--help"]
