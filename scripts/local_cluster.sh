#!/usr/bin/env bash
# A cluster of N hosts on this machine, for trying (and testing) multi-host jobs: each host is a
# network namespace with its own address on a private bridge, its own sshd, and a private /srv/hvd
# (a mount namespace over a per-host folder), so nothing is shared between hosts but the read-only
# image (this checkout, its .venv). Keys and logs live in the cluster folder, never in ~/.ssh.
# Needs root (namespaces) and openssh-server (installed from apt when missing).
#
#   scripts/local_cluster.sh up N [DIR]       make hosts 1..N, print the hostfile and ssh flags
#   scripts/local_cluster.sh down [DIR]       remove them (processes, namespaces, bridge, DIR)
#   scripts/local_cluster.sh ssh I [DIR] -- CMD   run CMD on host I (cwd: this directory)
#   scripts/local_cluster.sh kill I [DIR]     SIGKILL every process on host I (a lost host)
#   scripts/local_cluster.sh cut|heal I [DIR] take host I's link down / up (a partition)
#   scripts/local_cluster.sh ray I [DIR]      start a Ray node on host I: the head on host 1, else one
#                                             joining it (1 CPU each, token auth); prints the driver's env;
#                                             RAY_NODE_ENV="NAME=VALUE ..." adds to the node's environment
# DIR defaults to $HVD_ABS_CLUSTER_DIR or /tmp/hvd_abs_cluster.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "local_cluster: $*" >&2; exit 2; }

action=${1:-}; [ -n "$action" ] || usage; shift
count=""
case "$action" in
    up) count=${1:-}; [[ "$count" =~ ^[1-9][0-9]?$ ]] || die "up N: N must be 1..99, got '${count}'"; shift ;;
    ssh|kill|cut|heal|ray) host_i=${1:-}; [[ "$host_i" =~ ^[0-9]+$ ]] || die "$action I: I must be a host number"; shift ;;
    down|status) ;;
    *) usage ;;
esac
DIR=${HVD_ABS_CLUSTER_DIR:-/tmp/hvd_abs_cluster}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then DIR=$1; shift; fi
[ "${1:-}" = "--" ] && shift
DIR=$(realpath -m "$DIR")
STATE=$DIR/cluster.env
SRV=/srv/hvd  # the path every host sees as its own disk

need_root() { [ "$(id -u)" = 0 ] || die "needs root (network and mount namespaces); run it with sudo"; }
load() { [ -f "$STATE" ] || die "no cluster in $DIR: start one with 'scripts/local_cluster.sh up N $DIR'"; . "$STATE"; }
addr_of() { echo "$PREFIX.$((10 + $1))"; }
ns_of() { echo "hvdabs${TAG}h$1"; }
ssh_flags() { echo "-i $DIR/keys/id_ed25519 -o UserKnownHostsFile=$DIR/keys/known_hosts -o StrictHostKeyChecking=no -o BatchMode=yes -o ConnectTimeout=5 -o LogLevel=ERROR"; }

free_tag() {
    # A /24 of 10.231.T.0 that no address or route of this machine touches.
    local used t
    used=$( { ip -4 -o addr show; ip -4 route show table all; } 2>/dev/null)
    for t in $(seq 1 250); do
        if ! grep -q "10\.231\.$t\." <<<"$used" && ! ip link show "hvdabs${t}br" >/dev/null 2>&1; then
            echo "$t"; return
        fi
    done
    die "no free 10.231.T.0/24 subnet left; remove old clusters with 'down'"
}

ensure_sshd() {
    [ -x /usr/sbin/sshd ] && return
    echo "local_cluster: installing openssh-server (Debian's package)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server >/dev/null \
        || die "openssh-server is missing and apt-get could not install it: install it, then run 'up' again"
}

up() {
    need_root
    [ -f "$STATE" ] && die "a cluster already runs in $DIR: 'scripts/local_cluster.sh down $DIR' first"
    command -v ip >/dev/null && command -v unshare >/dev/null || die "needs iproute2 (ip) and util-linux (unshare)"
    ensure_sshd
    TAG=$(free_tag); PREFIX=10.231.$TAG
    mkdir -p "$DIR/keys" "$DIR/logs" "$DIR/run" "$SRV" /run/sshd
    chmod 700 "$DIR/keys"
    printf 'TAG=%s\nPREFIX=%s\nCOUNT=%s\n' "$TAG" "$PREFIX" "$count" > "$STATE"
    trap 'echo "local_cluster: up failed; cleaning up" >&2; down >/dev/null 2>&1 || true' ERR
    ssh-keygen -q -t ed25519 -N '' -C hvd_abs-local-cluster -f "$DIR/keys/id_ed25519"
    cp "$DIR/keys/id_ed25519.pub" "$DIR/keys/authorized_keys"
    local br=hvdabs${TAG}br i ns addr
    ip link add "$br" type bridge
    ip addr add "$PREFIX.1/24" dev "$br"
    ip link set "$br" up
    : > "$DIR/hostfile"
    for i in $(seq 1 "$count"); do
        ns=$(ns_of "$i"); addr=$(addr_of "$i")
        ip netns add "$ns"
        ip link add "hvdabs${TAG}v$i" type veth peer name eth0 netns "$ns"
        ip link set "hvdabs${TAG}v$i" master "$br" up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        mkdir -p "$DIR/hosts/h$i"
        ssh-keygen -q -t ed25519 -N '' -f "$DIR/keys/host_h$i"
        # sshd (and all it starts) in a private mount namespace where /srv/hvd is this host's folder.
        ip netns exec "$ns" unshare -m --propagation private sh -c "mount --bind '$DIR/hosts/h$i' '$SRV' && \
            exec /usr/sbin/sshd -f /dev/null -h '$DIR/keys/host_h$i' -o ListenAddress=$addr \
            -o AuthorizedKeysFile='$DIR/keys/authorized_keys' -o PidFile='$DIR/run/h$i.sshd.pid' \
            -o StrictModes=no -o UsePAM=no -o PermitRootLogin=prohibit-password -o MaxStartups=100 \
            -o MaxSessions=100 -E '$DIR/logs/h$i.sshd.log'"
        echo "$addr slots=1" >> "$DIR/hostfile"
    done
    for i in $(seq 1 "$count"); do  # every sshd answers before the cluster is declared up
        local ok=""
        for _ in $(seq 1 50); do
            # shellcheck disable=SC2046
            if ssh $(ssh_flags) "root@$(addr_of "$i")" true 2>/dev/null; then ok=1; break; fi
            sleep 0.2
        done
        [ -n "$ok" ] || die "host $i's sshd does not answer; see $DIR/logs/h$i.sshd.log"
    done
    trap - ERR
    echo "hostfile $DIR/hostfile"
    echo "ssh_flags --ssh-identity-file $DIR/keys/id_ed25519 --ssh-option UserKnownHostsFile=$DIR/keys/known_hosts"
    for i in $(seq 1 "$count"); do echo "host $i $(addr_of "$i") $(ns_of "$i") disk $DIR/hosts/h$i"; done
}

ray_node() {
    # Ray's files in the host's own disk (RAY_TMPDIR; /tmp is shared), its token and home in DIR:
    # nothing lands in the user's ~/.ray. The head listens on host 1's address, port 6379.
    load
    [ "$host_i" -ge 1 ] && [ "$host_i" -le "$COUNT" ] || die "no host $host_i (1..$COUNT)"
    local ray=${RAY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/ray} head
    [ -x "$ray" ] || die "no Ray at $ray: run 'make env' first, or set RAY=/path/to/ray"
    mkdir -p "$DIR/ray/home"
    [ -s "$DIR/ray/token" ] || (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$DIR/ray/token")
    head="$(addr_of 1):6379"
    # The hosts share this machine's cores: their workers (the training) are not niced below the
    # launchers and daemons beside them (Ray's default is 15).
    local env="HOME=$DIR/ray/home RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/ray/token RAY_TMPDIR=$SRV/ray"
    env="$env RAY_worker_niceness=0 ${RAY_NODE_ENV:-}"
    local start="--head --port 6379 --include-dashboard false"
    [ "$host_i" = 1 ] || start="--address $head"
    # shellcheck disable=SC2046
    ssh $(ssh_flags) "root@$(addr_of "$host_i")" "env $env $ray start $start --node-ip-address $(addr_of "$host_i") \
        --num-cpus 1 --disable-usage-stats > $DIR/logs/h$host_i.ray.log 2>&1" \
        || die "ray start on host $host_i failed; see $DIR/logs/h$host_i.ray.log"
    echo "ray_env RAY_ADDRESS=$head RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/ray/token RAY_TMPDIR=$SRV/ray"
}

down() {
    need_root
    [ -f "$STATE" ] || { echo "local_cluster: nothing in $DIR"; return 0; }
    . "$STATE"
    local i ns
    for i in $(seq 1 "$COUNT"); do
        ns=$(ns_of "$i")
        if ip netns list | grep -qw "$ns"; then
            ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
            ip netns del "$ns" 2>/dev/null || true
        fi
        ip link del "hvdabs${TAG}v$i" 2>/dev/null || true
    done
    ip link del "hvdabs${TAG}br" 2>/dev/null || true
    rm -rf "$DIR"
}

case "$action" in
    up) up ;;
    down) down ;;
    status) load; for i in $(seq 1 "$COUNT"); do
                echo "host $i $(addr_of "$i") processes $(ip netns pids "$(ns_of "$i")" 2>/dev/null | wc -l)"; done ;;
    ssh) load; [ "$host_i" -ge 1 ] && [ "$host_i" -le "$COUNT" ] || die "no host $host_i (1..$COUNT)"
         # shellcheck disable=SC2046
         exec ssh $(ssh_flags) "root@$(addr_of "$host_i")" "cd $(printf %q "$PWD") && $*" ;;
    kill) need_root; load; ip netns pids "$(ns_of "$host_i")" | xargs -r kill -9 ;;
    ray) ray_node ;;
    cut) need_root; load; ip -n "$(ns_of "$host_i")" link set eth0 down ;;
    heal) need_root; load; ip -n "$(ns_of "$host_i")" link set eth0 up ;;
esac
