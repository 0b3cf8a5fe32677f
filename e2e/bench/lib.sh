# Shared by the benchmark scripts (sourced).

# wait_port <port>: waits up to 10 s for 127.0.0.1:<port> to accept.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

# build_release: builds the broker and the load generator (release, the
# toolchain in RINGMQ_TOOLCHAIN, nightly by default) and sets $bin to the
# directory that holds them.
build_release() {
    cargo "+${RINGMQ_TOOLCHAIN:-nightly}" build --release --locked -p ringmq-broker -p ringmq-bench >&2
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
}
