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

# print_medians <reference>: the table of the alternating scripts (every
# round and the median per scenario and variant) and the ratio of the
# reference's median to each other variant's. Reads the caller's
# `scenarios` ("id:name:args"), `variants` and `runs` ("id,variant" ->
# "msgs/lost " per round).
print_medians() {
    local ref=$1 sc id rest v m shown
    local -A med
    echo "| scenario | broker | delivered msg/s per round (lost) | median msg/s |"
    echo "|---|---|---|---|"
    for sc in "${scenarios[@]}"; do
        id=${sc%%:*}
        rest=${sc#*:}
        for v in "${variants[@]}"; do
            m=$(tr ' ' '\n' <<<"${runs["$id,$v"]}" | cut -d/ -f1 | sed '/^$/d' | sort -g |
                awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : 0)}')
            med["$id,$v"]=$m
            shown=$(sed 's#/\([^ ]*\)# (\1)#g' <<<"${runs["$id,$v"]}")
            echo "| $id ${rest%%:*} | $v | $shown | $m |"
        done
    done
    echo
    for sc in "${scenarios[@]}"; do
        id=${sc%%:*}
        for v in "${variants[@]}"; do
            [ "$v" = "$ref" ] && continue
            awk -v id="$id" -v r="$ref" -v v="$v" -v a="${med["$id,$ref"]}" -v b="${med["$id,$v"]}" \
                'BEGIN { printf "- %s: %s ÷ %s = %.2f\n", id, r, v, (b > 0 ? a / b : 0) }'
        done
    done
}
