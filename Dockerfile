# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in slim Debian as a non-root user.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml names the benches: cargo wants their files even to build the binary.
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin raftlb \
    && rm -rf src
COPY src ./src
# The stub's build outputs are older than the real sources; touch so cargo rebuilds.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin raftlb

FROM debian:bookworm-slim
# iproute2 (`ip addr`) and iputils-arping (gratuitous ARP) move the VIP; tini runs as
# PID 1, reaping what role hooks leave behind and passing signals on to raftlb.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates iproute2 iputils-arping tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/raftlb --shell /usr/sbin/nologin raftlb \
    && mkdir -p /etc/raftlb /var/lib/raftlb \
    && chown raftlb:raftlb /etc/raftlb /var/lib/raftlb
COPY --from=builder /src/target/release/raftlb /usr/local/bin/raftlb
COPY config/standalone.yaml /etc/raftlb/raftlb.yaml
USER raftlb
# cluster.data_dir (the Raft log, vote and snapshots) belongs on a volume.
VOLUME ["/var/lib/raftlb"]
# 6443 apiserver listener, 9090 admin API and metrics, 7400 Raft peers: the ports of
# a config like config/kubeadm-external.yaml. The example config baked in below
# listens on loopback only; mount your own at /etc/raftlb/raftlb.yaml.
EXPOSE 6443 9090 7400
# A virtual IP (leader_election.vip) needs CAP_NET_ADMIN and CAP_NET_RAW in the host's
# network namespace. Docker gives added capabilities to root only (it sets no ambient
# capabilities for another user), so a replica that holds a VIP runs as root in the
# container:  docker run --user 0 --cap-add NET_ADMIN --cap-add NET_RAW --network host ...
# (on a host with systemd, packaging/raftlb.service runs it as a non-root user instead).
# SIGTERM drains for up to runtime.shutdown_grace (30 s by default), longer than
# docker's 10 s stop timeout: run with --stop-timeout 60 (or docker stop -t 60), as
# the systemd unit allows 60 s, or the drain is cut short by SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "raftlb"]
CMD ["run", "--config", "/etc/raftlb/raftlb.yaml"]
