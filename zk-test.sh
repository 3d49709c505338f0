#!/usr/bin/env bash
# zk-test.sh: a throw-away 3-server ZooKeeper ensemble on 127.0.0.1 for zkcelery's tests.
#
# Run with no argument to start it (or reuse the one already running); the connection
# string is the last line on stdout. `./zk-test.sh --help` lists the subcommands.
#
# Why an ensemble and not one standalone server: the lock tests kill and restart servers
# (leader failover, session survival), which only a quorum of three can show.

set -euo pipefail

readonly MAIN_CLASS=org.apache.zookeeper.server.quorum.QuorumPeerMain
readonly SERVERS=(1 2 3)

# Pinned fallback release, used only when neither $ZOOKEEPER_PATH nor the Debian package is
# available. The SHA-256 is pinned here (it is the value published for this tarball by two
# independent public build recipes); no published SHA-512 for it was found to pin, so the
# script also downloads the .sha512 file Apache publishes beside the tarball and compares
# against it when that file can be fetched.
readonly ZK_DL_VERSION=3.8.4
readonly ZK_DL_NAME="apache-zookeeper-${ZK_DL_VERSION}-bin"
readonly ZK_DL_URL="https://archive.apache.org/dist/zookeeper/zookeeper-${ZK_DL_VERSION}/${ZK_DL_NAME}.tar.gz"
readonly ZK_DL_SHA256=284cb4675adb64794c63d95bf202d265cebddc0cda86ac86fb0ede8049de9187

usage() {
    cat <<'EOF'
Usage: zk-test.sh [COMMAND]

Runs a 3-server ZooKeeper ensemble on 127.0.0.1 for tests, and beside it a RabbitMQ and a
Redis server for the tests that need a real Celery broker.

Commands:
  (none), start     start the ensemble and the brokers (ZK_TEST_BROKERS), or reuse those
                    already running; wait until every server serves; print the ZooKeeper
                    connection string (also written to DIR/hosts)
  stop [--clean]    stop the brokers (ZK_TEST_BROKERS) and all ZooKeeper servers (SIGTERM,
                    SIGKILL after 10 s); data is kept unless --clean, which also deletes the
                    state folder
  clean             same as stop --clean
  status            one line per server; exit 0 when a quorum serves, 1 otherwise
  leader            print the number (1-3) of the current leader; exit 1 if there is none
  wait              wait until a quorum serves; exit 1 on timeout
  hosts             print the connection string
  tls-hosts         print two lines: the TLS connection string (servers' secureClientPort,
                    127.0.0.1:base+100+N-1), then the path of the CA file (ca.pem) that
                    signed their certificate; exit 1 if no TLS material was made yet.
                    Also written to DIR/tls-hosts by a start with ZK_TEST_TLS=1
  stop-server N     stop server N (SIGTERM, SIGKILL after 10 s) and wait until its port closes
  kill-server N     SIGKILL server N at once (crash tests)
  start-server N    start server N and wait until it serves
  start-brokers [rabbitmq|redis]...
                    start the named brokers (default: ZK_TEST_BROKERS) and wait until they
                    serve; each prints its URL
  stop-brokers [rabbitmq|redis]...
                    stop them (default: ZK_TEST_BROKERS); the ensemble keeps running
  broker-status     one line per broker: running or down, URL, log; exit 1 if one is down
  broker-urls       print the two broker URLs (amqp://... then redis://...)
  rabbitmqctl ARGS  run rabbitmqctl against the test RabbitMQ (its node name and cookie)
  redis-cli ARGS    run redis-cli against the test Redis
  -h, --help        this text

Environment:
  ZK_TEST_PORT           base client port (default 2181): server N listens on base+N-1,
                         its quorum port is base+10000+N and its election port base+20000+N
  ZK_TEST_DIR            state folder (default: .zk-test beside this script, or .zk-test-PORT
                         when ZK_TEST_PORT is not 2181)
  ZK_TEST_TICK           tickTime in ms (default 200; min session timeout is 2 ticks)
  ZK_TEST_START_TIMEOUT  seconds to wait for servers to serve (default 60)
  ZK_TEST_FORCE_SYNC     set to "no" to skip fsync on every write (default: fsync)
  ZK_TEST_SOURCE         where ZooKeeper comes from: auto (default), path, debian, download
  ZK_TEST_TLS            1 to add a TLS client port to every server (default 0, off): server
                         N also listens for TLS on base+100+N-1 (2281-2283 by default), beside
                         its plain client port. A throw-away CA and a server certificate for
                         127.0.0.1/localhost are made once with openssl into DIR/tls (ca.pem,
                         server.pem, server-key.pem, keystore.p12, truststore.p12; store
                         password "zk-test-only"). Clients need no certificate. Give the same
                         value to every command that starts servers (start, start-server);
                         starting with a value that differs from the running servers fails
  ZK_TEST_TTL            1 (default) lets the servers make TTL nodes
                         (zookeeper.extendedTypesEnabled=true); 0 keeps ZooKeeper's own default,
                         off, as most production servers run
  ZOOKEEPER_PATH         an unpacked Apache ZooKeeper release, used first when set
  ZK_TEST_BROKERS        the brokers that start and stop handle besides the ensemble:
                         "rabbitmq redis" (default), one of them, or "none"
  ZK_TEST_AMQP_PORT      RabbitMQ's AMQP port on 127.0.0.1 (default 5672). Its Erlang
                         distribution port is this plus 20000 (RabbitMQ's own rule), and it
                         gets a private epmd on ZK_TEST_EPMD_PORT (default AMQP port plus
                         20001), so that it shares nothing with another RabbitMQ; its node
                         name is zk-test-PORT@localhost
  ZK_TEST_REDIS_PORT     Redis's port on 127.0.0.1 (default 6379)
  ZK_TEST_RABBITMQ_BIN   RabbitMQ's scripts folder (default /usr/lib/rabbitmq/bin, Debian's)

ZooKeeper comes from $ZOOKEEPER_PATH, else the Debian "zookeeper" package (installed with
apt-get when running as root), else Apache ZooKeeper 3.8.4 downloaded and checked into
${XDG_CACHE_HOME:-$HOME/.cache}/zkcelery.

The brokers come from Debian's "rabbitmq-server" and "redis-server" packages, installed with
apt-get when missing (without starting the system services). Each runs from its own folder
in the state folder (DIR/rabbitmq-PORT, DIR/redis-PORT): data, configuration, log, pid.
EOF
}

log() { printf 'zk-test: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

now_ms() {
    # EPOCHREALTIME has microseconds; strip the locale's decimal separator.
    local t=${EPOCHREALTIME//[!0-9]/}
    echo $((10#$t / 1000))
}

# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

SCRIPT_DIR=$(cd -P -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd)

BASE_PORT=${ZK_TEST_PORT:-2181}
TICK=${ZK_TEST_TICK:-200}
START_TIMEOUT=${ZK_TEST_START_TIMEOUT:-60}
SOURCE=${ZK_TEST_SOURCE:-auto}
is_uint "$BASE_PORT" || die "ZK_TEST_PORT must be a number, not '$BASE_PORT'"
{ is_uint "$TICK" && ((10#$TICK > 0)); } || die "ZK_TEST_TICK must be a positive number of ms, not '$TICK'"
is_uint "$START_TIMEOUT" || die "ZK_TEST_START_TIMEOUT must be a number of seconds, not '$START_TIMEOUT'"
BASE_PORT=$((10#$BASE_PORT))
TICK=$((10#$TICK))
START_TIMEOUT=$((10#$START_TIMEOUT))
# The election port of server 3 is base+20003; it must still be a valid port.
((BASE_PORT >= 1024 && BASE_PORT + 20003 <= 65535)) ||
    die "ZK_TEST_PORT must be between 1024 and 45532 (server 3's election port is base+20003)"
case $SOURCE in auto | path | debian | download) ;; *) die "ZK_TEST_SOURCE must be auto, path, debian or download" ;; esac
case ${ZK_TEST_TLS:-0} in
    1 | yes | true | on) TLS=1 ;;
    0 | no | false | off) TLS=0 ;;
    *) die "ZK_TEST_TLS must be 1 (TLS client port on) or 0 (off, the default), not '$ZK_TEST_TLS'" ;;
esac

# Each base port gets its own default state folder, so ensembles on different ports never
# share pid files or data.
if [[ -n ${ZK_TEST_DIR:-} ]]; then
    STATE_DIR=$(realpath -m -- "$ZK_TEST_DIR")
elif ((BASE_PORT == 2181)); then
    STATE_DIR=$SCRIPT_DIR/.zk-test
else
    STATE_DIR=$SCRIPT_DIR/.zk-test-$BASE_PORT
fi
[[ $STATE_DIR != / ]] || die "ZK_TEST_DIR must not be /"

# TLS material (ZK_TEST_TLS=1): a throw-away CA and a server certificate, made once.
TLS_DIR=$STATE_DIR/tls
readonly TLS_STORE_PASS=zk-test-only

declare -a CPORT=() SPORT=() QPORT=() EPORT=() CFG=() SDIR=()
for n in "${SERVERS[@]}"; do
    CPORT[n]=$((BASE_PORT + n - 1))
    SPORT[n]=$((BASE_PORT + 100 + n - 1))
    QPORT[n]=$((BASE_PORT + 10000 + n))
    EPORT[n]=$((BASE_PORT + 20000 + n))
    SDIR[n]=$STATE_DIR/$n
    CFG[n]=$STATE_DIR/$n/zoo.cfg
done
unset n

# Brokers. Each gets its own folder in the state folder, named after its port, so that two
# of them on different ports never share data, pid files or (RabbitMQ) an Erlang cookie.
AMQP_PORT=${ZK_TEST_AMQP_PORT:-5672}
REDIS_PORT=${ZK_TEST_REDIS_PORT:-6379}
is_uint "$AMQP_PORT" || die "ZK_TEST_AMQP_PORT must be a number, not '$AMQP_PORT'"
is_uint "$REDIS_PORT" || die "ZK_TEST_REDIS_PORT must be a number, not '$REDIS_PORT'"
AMQP_PORT=$((10#$AMQP_PORT))
REDIS_PORT=$((10#$REDIS_PORT))
((AMQP_PORT >= 1024 && AMQP_PORT + 20000 <= 65535)) ||
    die "ZK_TEST_AMQP_PORT must be between 1024 and 45535 (its distribution port is AMQP port+20000)"
((REDIS_PORT >= 1024 && REDIS_PORT <= 65535)) || die "ZK_TEST_REDIS_PORT must be between 1024 and 65535"
RABBIT_DIST_PORT=$((AMQP_PORT + 20000))
EPMD_PORT=${ZK_TEST_EPMD_PORT:-$((AMQP_PORT + 20001))}
{ is_uint "$EPMD_PORT" && ((10#$EPMD_PORT >= 1024 && 10#$EPMD_PORT <= 65535)); } ||
    die "ZK_TEST_EPMD_PORT must be a port number from 1024 to 65535, not '$EPMD_PORT'"
EPMD_PORT=$((10#$EPMD_PORT))
RABBIT_NODE=zk-test-$AMQP_PORT@localhost
RABBIT_DIR=$STATE_DIR/rabbitmq-$AMQP_PORT
RABBIT_BIN=${ZK_TEST_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
REDIS_DIR=$STATE_DIR/redis-$REDIS_PORT
AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT//
REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0

# The brokers that start/stop handle: "rabbitmq redis" by default, "none" for neither.
declare -a BROKERS=()
check_broker_names() {
    local b
    for b in "$@"; do
        [[ $b == rabbitmq || $b == redis ]] ||
            die "unknown broker '$b' (expected rabbitmq or redis; ZK_TEST_BROKERS=none for neither)"
    done
}
read -r -a BROKERS <<<"${ZK_TEST_BROKERS-rabbitmq redis}"
if [[ ${BROKERS[*]:-} == none || ${BROKERS[*]:-} == 0 ]]; then BROKERS=(); fi
check_broker_names "${BROKERS[@]}"

hosts_string() {
    local n out=""
    for n in "${SERVERS[@]}"; do out+="${out:+,}127.0.0.1:${CPORT[n]}"; done
    echo "$out"
}

# Two lines: the TLS connection string, then the CA file that signed the servers' certificate.
tls_hosts_string() {
    local n out=""
    for n in "${SERVERS[@]}"; do out+="${out:+,}127.0.0.1:${SPORT[n]}"; done
    printf '%s\n%s\n' "$out" "$TLS_DIR/ca.pem"
}

cmd_tls_hosts() {
    [[ -f $TLS_DIR/ca.pem ]] ||
        die "no TLS material in $TLS_DIR: start the ensemble with ZK_TEST_TLS=1 first"
    tls_hosts_string
}

check_server_arg() {
    [[ ${1:-} =~ ^[123]$ ]] || die "expected a server number 1, 2 or 3, got '${1:-}'"
}

# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------

# True when PID is alive and is the QuorumPeerMain started with config file CFG. Checking
# the command line, not just `kill -0`, keeps a stale pid file (dead pid, or a pid reused by
# another program) from passing for a live server. A zombie has an empty cmdline, so a
# killed server nobody has reaped yet counts as gone too.
is_our_server() {
    local pid=$1 cfg=$2 a has_main=0 has_cfg=0
    local -a args=()
    is_uint "$pid" || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || return 1
    for a in "${args[@]}"; do
        [[ $a == "$MAIN_CLASS" ]] && has_main=1
        [[ $a == "$cfg" ]] && has_cfg=1
    done
    ((has_main && has_cfg))
}

# Print the pid of server N when it is running. The pid file is the fast path; when it is
# missing or stale, /proc is searched so that a server whose pid file was lost is found and
# adopted instead of a second copy being started on the same ports.
server_pid() {
    local n=$1 pidfile=${SDIR[$1]}/pid cfg=${CFG[$1]} pid="" d
    if [[ -r $pidfile ]]; then
        read -r pid <"$pidfile" || true
        if is_our_server "$pid" "$cfg"; then
            echo "$pid"
            return 0
        fi
    fi
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if is_our_server "$pid" "$cfg"; then
            [[ -d ${SDIR[n]} ]] && echo "$pid" >"$pidfile"
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# Command line of a process, for messages.
proc_cmdline() {
    local -a args=()
    mapfile -d '' -t args 2>/dev/null <"/proc/$1/cmdline" || return 1
    local s="${args[*]}"
    ((${#s} > 160)) && s="${s:0:157}..."
    printf '%s' "$s"
}

# ---------------------------------------------------------------------------------------
# Talking to servers
# ---------------------------------------------------------------------------------------

# Send a four-letter word to 127.0.0.1:PORT and print the answer. Pure bash (/dev/tcp), so
# it works without nc; `read -t` bounds each read, so a server that accepts but never
# answers cannot hang the caller. Call it inside $(...): it uses fd 3 of that subshell.
zk_4lw() {
    local port=$1 word=$2 line="" out=""
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    printf '%s' "$word" >&3 2>/dev/null || { exec 3<&-; return 1; }
    while IFS= read -r -t 1 -u 3 line || [[ -n $line ]]; do
        out+=$line$'\n'
        line=""
    done
    exec 3<&-
    printf '%s' "$out"
}

# Mode of the server on PORT: leader, follower, observer, standalone, or "not serving"
# (no answer yet, or up but without a quorum).
zk_mode() {
    local out
    out=$(zk_4lw "$1" srvr) || { echo "not serving"; return 0; }
    if [[ $out =~ Mode:\ ([a-z]+) ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo "not serving"
    fi
}

declare -a PIDS=() MODES=()

# Fill PIDS[n] (empty when down) and MODES[n] (down, not serving, leader, follower...).
probe_all() {
    local n pid
    for n in "${SERVERS[@]}"; do
        if pid=$(server_pid "$n"); then
            PIDS[n]=$pid
            MODES[n]=$(zk_mode "${CPORT[n]}")
        else
            PIDS[n]=""
            MODES[n]=down
        fi
    done
}

is_serving_mode() { [[ $1 == leader || $1 == follower || $1 == observer ]]; }

# After probe_all: a quorum serves when a leader is up and at least two servers (the
# leader included) are leader or follower.
quorum_serves() {
    local n leaders=0 serving=0
    for n in "${SERVERS[@]}"; do
        [[ ${MODES[n]} == leader ]] && leaders=$((leaders + 1))
        [[ ${MODES[n]} == leader || ${MODES[n]} == follower ]] && serving=$((serving + 1))
    done
    ((leaders >= 1 && serving >= 2))
}

# After probe_all: is TARGET reached? TARGET is "quorum", "all" (every server serves and a
# quorum does) or a server number (that server serves).
target_reached() {
    local n
    case $1 in
        quorum) quorum_serves ;;
        all)
            quorum_serves || return 1
            for n in "${SERVERS[@]}"; do is_serving_mode "${MODES[n]}" || return 1; done
            ;;
        *) is_serving_mode "${MODES[$1]}" ;;
    esac
}

show_log_tails() {
    local n
    for n in "${SERVERS[@]}"; do
        [[ -f ${SDIR[n]}/server.log ]] || continue
        printf '\n----- server %s: last lines of %s -----\n' "$n" "${SDIR[n]}/server.log" >&2
        tail -n 15 "${SDIR[n]}/server.log" >&2 || true
    done
    printf '\n' >&2
}

print_status_lines() {
    local n
    for n in "${SERVERS[@]}"; do
        printf 'server %s  127.0.0.1:%-5s  %-11s  pid %-7s  log %s\n' \
            "$n" "${CPORT[n]}" "${MODES[n]}" "${PIDS[n]:--}" "${SDIR[n]}/server.log"
    done
}

# Poll every 0.15 s until TARGET (see target_reached) is reached. Gives up at once when the
# target can no longer be reached (too few server processes alive), and after
# ZK_TEST_START_TIMEOUT seconds otherwise; either way it shows the end of each server log.
wait_for() {
    local target=$1 deadline n alive why
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        probe_all
        target_reached "$target" && return 0
        alive=0
        for n in "${SERVERS[@]}"; do [[ -n ${PIDS[n]} ]] && alive=$((alive + 1)); done
        why=""
        case $target in
            quorum) ((alive >= 2)) || why="only $alive of 3 servers are running; a quorum needs 2" ;;
            all) ((alive == 3)) || why="only $alive of 3 servers are running (a server exited?)" ;;
            *) [[ -n ${PIDS[target]} ]] || why="server $target is not running (it exited?)" ;;
        esac
        if [[ -z $why ]] && (($(now_ms) >= deadline)); then
            why="timed out after ${START_TIMEOUT}s (ZK_TEST_START_TIMEOUT)"
        fi
        if [[ -n $why ]]; then
            case $target in
                quorum) log "no quorum: $why" ;;
                all) log "ensemble not ready: $why" ;;
                *) log "server $target not serving: $why" ;;
            esac
            print_status_lines >&2
            show_log_tails
            return 1
        fi
        sleep 0.15
    done
}

# ---------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------

# If something listens on PORT in a way that stops us binding 127.0.0.1:PORT, print who it
# is and return 0; return 1 when the port is free. Uses `ss` (names the process) and falls
# back to connecting with bash's /dev/tcp.
port_user() {
    local port=$1 listeners line pid name what
    if command -v ss >/dev/null 2>&1 && listeners=$(ss -Hltnp 2>/dev/null); then
        line=$(awk -v p="$port" '{
                addr = $4; n = split(addr, a, ":"); if (a[n] != p) next
                host = substr(addr, 1, length(addr) - length(p) - 1); sub(/%.*/, "", host)
                if (host ~ /^(127\.0\.0\.1|0\.0\.0\.0|\*|\[::\]|\[::ffff:127\.0\.0\.1\]|\[::ffff:0\.0\.0\.0\])$/) { print; exit }
            }' <<<"$listeners")
        [[ -n $line ]] || return 1
        if [[ $line =~ \(\(\"([^\"]*)\",pid=([0-9]+) ]]; then
            name=${BASH_REMATCH[1]}
            pid=${BASH_REMATCH[2]}
            what="$name (pid $pid"
            if line=$(proc_cmdline "$pid"); then what+=": $line"; fi
            echo "$what)"
        else
            echo "an unknown process (ss could not tell which; try: sudo ss -ltnp 'sport = :$port')"
        fi
        return 0
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "an unknown process (install iproute2 for 'ss -ltnp' to see which)"
        return 0
    fi
    return 1
}

# Fail, naming every port and its user, when a port needed by one of the given servers is
# taken by something that is not that server. Called only for servers that are down.
check_ports_free() {
    local n port kind who bad=0 kinds="client quorum election"
    ((TLS)) && kinds+=" TLS-client"
    for n in "$@"; do
        for kind in $kinds; do
            case $kind in
                client) port=${CPORT[n]} ;;
                TLS-client) port=${SPORT[n]} ;;
                quorum) port=${QPORT[n]} ;;
                election) port=${EPORT[n]} ;;
            esac
            if who=$(port_user "$port"); then
                log "error: port $port ($kind port of server $n) is already in use by $who"
                bad=1
            fi
        done
    done
    if ((bad)); then
        die "cannot start ZooKeeper: needed ports are taken by other programs. Stop them, or" \
            "use other ports with ZK_TEST_PORT=<base> (server N uses base+N-1, base+10000+N, base+20000+N," \
            "and base+100+N-1 with ZK_TEST_TLS=1)."
    fi
}

# Wait until nothing listens on PORT any more (up to 10 s).
wait_port_closed() {
    local port=$1 deadline
    deadline=$(($(now_ms) + 10000))
    while port_user "$port" >/dev/null; do
        (($(now_ms) < deadline)) || { log "warning: port $port still in use after 10 s"; return 1; }
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------------------
# Java and ZooKeeper
# ---------------------------------------------------------------------------------------

APT_UPDATED=0
JAVA=""
CLASSPATH_ZK=""
declare -a SOURCE_FLAGS=()

can_apt() { [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; }

# apt-get install, running `apt-get update` first, but only once per run and only when
# something really has to be installed. Output goes to stderr: stdout is for the hosts line.
apt_install() {
    if ((!APT_UPDATED)); then
        log "running apt-get update"
        apt-get update >&2 || return 1
        APT_UPDATED=1
    fi
    log "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
}

ensure_java() {
    if command -v java >/dev/null 2>&1; then
        JAVA=$(command -v java)
    elif [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        JAVA=$JAVA_HOME/bin/java
    elif can_apt; then
        apt_install default-jre-headless || die "could not install Java (apt-get install default-jre-headless failed)"
        JAVA=$(command -v java) || die "default-jre-headless is installed but 'java' is not on PATH"
    else
        die "Java not found: put 'java' on PATH or set JAVA_HOME (Debian/Ubuntu: apt-get install default-jre-headless)"
    fi
}

# Unpacked Apache release: its lib/ holds ZooKeeper, its deps and the logback binding; conf/
# holds logback.xml (without it logback logs at DEBUG).
use_apache_release() {
    local dir=$1
    CLASSPATH_ZK="$dir/conf:$dir/lib/*:$dir/*"
    SOURCE_FLAGS=()
    ZK_FROM="Apache release in $dir"
}

valid_apache_release() {
    local dir=$1
    [[ -d $dir/lib ]] || return 1
    compgen -G "$dir/lib/zookeeper-[0-9]*.jar" >/dev/null || compgen -G "$dir/zookeeper-[0-9]*.jar" >/dev/null
}

readonly DEB_ZK_JAR=/usr/share/java/zookeeper.jar
readonly DEB_SLF4J_SIMPLE=/usr/share/java/slf4j-simple.jar

# Debian's zookeeper.jar names its dependencies in its manifest Class-Path, but no SLF4J
# binding: without one the server logs nothing. slf4j-simple (package libslf4j-java) logs to
# stderr, which goes to server.log.
use_debian() {
    CLASSPATH_ZK="$DEB_ZK_JAR:$DEB_SLF4J_SIMPLE"
    SOURCE_FLAGS=(-Dorg.slf4j.simpleLogger.defaultLogLevel=info
        -Dorg.slf4j.simpleLogger.showDateTime=true
        "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS")
    ZK_FROM="Debian package ($DEB_ZK_JAR)"
}

debian_present() { [[ -f $DEB_ZK_JAR && -f $DEB_SLF4J_SIMPLE ]]; }

fetch_url() { # URL DEST
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 2 --connect-timeout 15 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 15 -t 3 -O "$2" "$1"
    else
        log "neither curl nor wget is installed"
        return 1
    fi
}

# The hex digest in an Apache .sha512 file. Both published layouts are handled:
# "<hex>  <file>" (sha512sum) and "<file>: 8A3F 29B5 ..." (gpg --print-md, split over lines).
published_sha512() {
    local text
    text=$(tr -d '\r\n' <"$1")
    if [[ $text =~ ^([0-9a-fA-F]{128}) ]]; then
        text=${BASH_REMATCH[1]}
    else
        text=${text#*:}
        text=${text//[[:space:]]/}
    fi
    text=${text,,}
    [[ $text =~ ^[0-9a-f]{128}$ ]] || return 1
    echo "$text"
}

# Download the pinned release into the cache, check it, unpack it; reuse it next time.
download_zookeeper() {
    local cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/zkcelery
    local dest=$cache/$ZK_DL_NAME tarball=$cache/$ZK_DL_NAME.tar.gz got want tmp
    if valid_apache_release "$dest"; then
        use_apache_release "$dest"
        return 0
    fi
    mkdir -p "$cache" || die "cannot create cache folder $cache"
    if [[ ! -f $tarball ]] || [[ $(sha256sum "$tarball" | cut -d' ' -f1) != "$ZK_DL_SHA256" ]]; then
        log "downloading $ZK_DL_URL"
        rm -f "$tarball.part"
        fetch_url "$ZK_DL_URL" "$tarball.part" || {
            rm -f "$tarball.part"
            die "could not download ZooKeeper from $ZK_DL_URL (no network?). Install the Debian" \
                "'zookeeper' package, or unpack an Apache ZooKeeper release and set ZOOKEEPER_PATH to it."
        }
        got=$(sha256sum "$tarball.part" | cut -d' ' -f1)
        if [[ $got != "$ZK_DL_SHA256" ]]; then
            rm -f "$tarball.part"
            die "checksum mismatch for $ZK_DL_URL: SHA-256 is $got, expected $ZK_DL_SHA256; the file was deleted"
        fi
        mv -f "$tarball.part" "$tarball"
    fi
    # Second check against the SHA-512 Apache publishes beside the tarball.
    if fetch_url "$ZK_DL_URL.sha512" "$tarball.sha512" 2>/dev/null && want=$(published_sha512 "$tarball.sha512"); then
        got=$(sha512sum "$tarball" | cut -d' ' -f1)
        if [[ $got != "$want" ]]; then
            rm -f "$tarball" "$tarball.sha512"
            die "checksum mismatch for $ZK_DL_URL: SHA-512 is $got, the published one is $want; the file was deleted"
        fi
    else
        log "warning: could not fetch or read $ZK_DL_URL.sha512; relying on the pinned SHA-256 only"
    fi
    rm -f "$tarball.sha512"
    # Unpack beside the destination and rename, so an interrupted unpack never looks valid.
    tmp=$(mktemp -d "$cache/unpack.XXXXXX")
    tar -xzf "$tarball" -C "$tmp" || { rm -rf "$tmp"; die "could not unpack $tarball"; }
    valid_apache_release "$tmp/$ZK_DL_NAME" || { rm -rf "$tmp"; die "$tarball does not hold $ZK_DL_NAME/lib"; }
    rm -rf "$dest"
    mv "$tmp/$ZK_DL_NAME" "$dest"
    rm -rf "$tmp"
    log "ZooKeeper $ZK_DL_VERSION unpacked in $dest"
    use_apache_release "$dest"
}

ZK_FROM=""

ensure_zookeeper() {
    if [[ $SOURCE == auto || $SOURCE == path ]] && [[ -n ${ZOOKEEPER_PATH:-} ]]; then
        valid_apache_release "$ZOOKEEPER_PATH" ||
            die "ZOOKEEPER_PATH=$ZOOKEEPER_PATH is not an unpacked ZooKeeper release (no lib/zookeeper-*.jar)"
        use_apache_release "$(realpath -- "$ZOOKEEPER_PATH")"
        return 0
    fi
    [[ $SOURCE == path ]] && die "ZK_TEST_SOURCE=path but ZOOKEEPER_PATH is not set"
    if [[ $SOURCE == auto || $SOURCE == debian ]]; then
        if ! debian_present && can_apt; then
            apt_install zookeeper libslf4j-java || log "warning: apt-get install zookeeper failed"
        fi
        if debian_present; then
            use_debian
            return 0
        fi
        [[ $SOURCE == debian ]] && die "the Debian zookeeper package is not installed (and could not be installed: needs root and apt-get)"
    fi
    download_zookeeper
}

# ---------------------------------------------------------------------------------------
# TLS (ZK_TEST_TLS=1)
# ---------------------------------------------------------------------------------------

# Debian's zookeeper.jar lists netty-handler, -buffer, -common, -transport and
# -transport-native-epoll in its manifest Class-Path, but not netty-codec, which
# NettyServerCnxnFactory (needed for secureClientPort) also uses: without it the servers
# start and bind their ports, yet drop every connection, plain or TLS, with
# "NoClassDefFoundError: io/netty/handler/codec/ByteToMessageDecoder" in server.log.
# (netty-resolver and netty-transport-native-unix-common were not needed: the JNI part of
# epoll is not packaged, so Netty uses NIO.)
readonly DEB_NETTY_EXTRA=(netty-codec)

# Add the jars above to the classpath when ZooKeeper comes from the Debian package. An Apache
# release's lib/ already holds all of netty.
tls_classpath() {
    local jar path
    [[ $ZK_FROM == Debian* ]] || return 0
    for jar in "${DEB_NETTY_EXTRA[@]}"; do
        path=/usr/share/java/$jar.jar
        if [[ ! -f $path ]] && can_apt; then
            apt_install libnetty-java || true
        fi
        [[ -f $path ]] || die "ZK_TEST_TLS=1 needs $path (Debian package libnetty-java)"
        CLASSPATH_ZK+=":$path"
    done
}

ensure_openssl() {
    command -v openssl >/dev/null 2>&1 && return 0
    if can_apt; then
        apt_install openssl || die "could not install openssl (apt-get install openssl failed)"
    else
        die "ZK_TEST_TLS=1 needs openssl (Debian/Ubuntu: apt-get install openssl)"
    fi
}

# keytool comes with the JRE; look beside the java in use first.
find_keytool() {
    local kt
    kt=$(dirname -- "$(readlink -f -- "$JAVA")")/keytool
    if [[ -x $kt ]]; then
        echo "$kt"
    else
        command -v keytool || return 1
    fi
}

readonly TLS_FILES=(ca.pem ca-key.pem server.pem server-key.pem keystore.p12 truststore.p12)

# Make, once, in $TLS_DIR: a throw-away CA (ca.pem, ca-key.pem), a server certificate for
# 127.0.0.1 and localhost signed by it (server.pem, server-key.pem), and for the Java side a
# PKCS12 keystore (server key and chain) and truststore (the CA), both with the password
# $TLS_STORE_PASS. Everything is made in a temporary folder and moved in at the end, so an
# interrupted run never leaves half a set behind.
ensure_tls_material() {
    local f missing=0 tmp keytool
    for f in "${TLS_FILES[@]}"; do [[ -s $TLS_DIR/$f ]] || missing=1; done
    ((missing)) || return 0
    ensure_openssl
    keytool=$(find_keytool) || die "keytool (part of the Java runtime) not found; it makes the TLS truststore"
    mkdir -p "$STATE_DIR"
    tmp=$(mktemp -d "$STATE_DIR/tls.tmp.XXXXXX")
    log "making a throw-away CA and server certificate in $TLS_DIR"
    if ! (
        set -e
        cd "$tmp"
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
            -subj "/CN=zk-test.sh throw-away CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout ca-key.pem -out ca.pem
        openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
            -keyout server-key.pem -out server.csr
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth,clientAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext
        openssl x509 -req -sha256 -days 3650 -in server.csr -CA ca.pem -CAkey ca-key.pem \
            -set_serial "0x$(openssl rand -hex 16)" -extfile server.ext -out server.pem
        openssl pkcs12 -export -name server -in server.pem -inkey server-key.pem \
            -certfile ca.pem -out keystore.p12 -passout "pass:$TLS_STORE_PASS"
        # keytool, not openssl: Java only trusts PKCS12 certificate entries that carry its
        # own "trusted" attribute, which openssl 3.0 cannot write.
        "$keytool" -importcert -noprompt -alias ca -file ca.pem -storetype PKCS12 \
            -keystore truststore.p12 -storepass "$TLS_STORE_PASS"
        rm -f server.csr server.ext
        chmod 600 ca-key.pem server-key.pem
    ) >"$tmp/make.log" 2>&1; then
        cat "$tmp/make.log" >&2
        rm -rf "$tmp"
        die "could not make the TLS certificates (see the output above)"
    fi
    rm -f "$tmp/make.log"
    mkdir -p "$TLS_DIR"
    for f in "${TLS_FILES[@]}"; do mv -f "$tmp/$f" "$TLS_DIR/$f"; done
    rm -rf "$tmp"
}

# True when the config file of server N (as last written) turns the TLS port on.
cfg_has_tls() { [[ -f ${CFG[$1]} ]] && grep -q '^secureClientPort=' "${CFG[$1]}"; }

# Reusing running servers that were started with the other ZK_TEST_TLS setting would give
# an ensemble without the TLS port asked for, or one with TLS on some servers only.
check_tls_mode() {
    local n want had
    for n in "${SERVERS[@]}"; do
        server_pid "$n" >/dev/null || continue
        had=0
        cfg_has_tls "$n" && had=1
        ((had == TLS)) && continue
        if ((TLS)); then want="ZK_TEST_TLS=1 but"; else want="ZK_TEST_TLS is off but"; fi
        if ((had)); then want+=" server $n was started with TLS"; else want+=" server $n was started without TLS"; fi
        die "$want ($STATE_DIR). Use the same ZK_TEST_TLS as when it was started, or stop it" \
            "($0 stop), or use another ZK_TEST_PORT and ZK_TEST_DIR."
    done
}

# ---------------------------------------------------------------------------------------
# Starting and stopping
# ---------------------------------------------------------------------------------------

# Lock the state folder, so two test processes running this script at once do not both
# start servers. fd 9 is closed for the servers themselves (see start_server).
take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w $((START_TIMEOUT + 60)) 9 || die "another zk-test.sh is still busy with $STATE_DIR"
}

# The state folder remembers its base port, so a folder shared by two ZK_TEST_PORT values
# (same ZK_TEST_DIR) is not silently mixed up.
check_port_marker() {
    local marker=$STATE_DIR/port recorded n
    [[ -f $marker ]] || return 0
    read -r recorded <"$marker" || return 0
    [[ $recorded == "$BASE_PORT" ]] && return 0
    # Are servers of the other ensemble running from this folder? Their cmdline names the
    # same config paths, so server_pid finds them.
    for n in "${SERVERS[@]}"; do
        if server_pid "$n" >/dev/null; then
            die "$STATE_DIR is used by an ensemble running on base port $recorded; stop it" \
                "(ZK_TEST_PORT=$recorded $0 stop) or set ZK_TEST_DIR to another folder"
        fi
    done
}

init_state_dir() {
    mkdir -p "$STATE_DIR"
    echo "$BASE_PORT" >"$STATE_DIR/port"
}

write_config() {
    local n=$1 m dir=${SDIR[$1]}
    mkdir -p "$dir/data"
    echo "$n" >"$dir/data/myid"
    {
        echo "# Generated by zk-test.sh; rewritten each time this server is started."
        echo "tickTime=$TICK"
        echo "initLimit=100"
        echo "syncLimit=25"
        # min session timeout stays at its default, 2 ticks. Longer sessions are capped at 5 s,
        # as some production ensembles cap them: the tests show that zkcelery times a lost
        # lease from the timeout the server granted, not the one it asked for.
        echo "maxSessionTimeout=5000"
        echo "dataDir=$dir/data"
        echo "clientPort=${CPORT[n]}"
        echo "clientPortAddress=127.0.0.1"
        echo "admin.enableServer=false"
        echo "4lw.commands.whitelist=*"
        # A static ensemble: no reconfig (which would also make ZooKeeper rewrite this file)
        echo "reconfigEnabled=false"
        echo "standaloneEnabled=false"
        echo "autopurge.purgeInterval=0"
        for m in "${SERVERS[@]}"; do
            echo "server.$m=127.0.0.1:${QPORT[m]}:${EPORT[m]}"
        done
        if ((TLS)); then
            # TLS client port (ZK_TEST_TLS=1); the plain clientPort above stays. ZooKeeper
            # turns the keys it does not know (serverCnxnFactory, ssl.*) into "zookeeper."
            # system properties, which is where the Netty factory reads them.
            echo "secureClientPort=${SPORT[n]}"
            echo "secureClientPortAddress=127.0.0.1"
            echo "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory"
            echo "ssl.keyStore.location=$TLS_DIR/keystore.p12"
            echo "ssl.keyStore.password=$TLS_STORE_PASS"
            echo "ssl.keyStore.type=PKCS12"
            echo "ssl.trustStore.location=$TLS_DIR/truststore.p12"
            echo "ssl.trustStore.password=$TLS_STORE_PASS"
            echo "ssl.trustStore.type=PKCS12"
            # Clients need no certificate of their own (server-side TLS only)
            echo "ssl.clientAuth=none"
        fi
    } >"$dir/zoo.cfg.tmp"
    mv -f "$dir/zoo.cfg.tmp" "${CFG[n]}"
}

jvm_flags() {
    JVM_FLAGS=(-Xmx192m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto
        # Containers (used by zkcelery's lock parents) are reaped quickly, so tests see it.
        -Dznode.container.checkIntervalMs=200 -Dznode.container.maxPerMinute=100000
        -Dzookeeper.admin.enableServer=false)
    case ${ZK_TEST_TTL:-1} in  # TTL nodes: on for the test ensemble, off by ZooKeeper's default
        1 | yes | true | on) JVM_FLAGS+=(-Dzookeeper.extendedTypesEnabled=true) ;;
        0 | no | false | off) ;;
        *) die "ZK_TEST_TTL must be 1 (TTL nodes allowed, the default) or 0, not '$ZK_TEST_TTL'" ;;
    esac
    if [[ ${ZK_TEST_FORCE_SYNC:-yes} == no ]]; then
        JVM_FLAGS+=(-Dzookeeper.forceSync=no)
    fi
    JVM_FLAGS+=("${SOURCE_FLAGS[@]}")
}

declare -a JVM_FLAGS=()

# Start server N in the background, detached (setsid + nohup), so it outlives this script
# and the shell or CI step that ran it. The small bash wrapper writes its own pid and then
# execs java, so the pid file holds the JVM's pid even if setsid had to fork.
# Everything a server needs before it can start: Java, ZooKeeper, TLS material when
# asked for, the JVM's flags and the state folder.
prepare_to_start() {
    ensure_java
    ensure_zookeeper
    if ((TLS)); then
        ensure_tls_material
        tls_classpath
    fi
    jvm_flags
    init_state_dir
}

start_server() {
    local n=$1 dir=${SDIR[$1]}
    write_config "$n"
    rm -f "$dir/pid"
    printf '==== zk-test.sh: starting server %s at %s (ZooKeeper from %s)\n' \
        "$n" "$(date '+%Y-%m-%d %H:%M:%S')" "$ZK_FROM" >>"$dir/server.log"
    # shellcheck disable=SC2016  # $$ and $@ are for the inner bash
    setsid nohup bash -c 'echo $$ >"$0" && exec "$@"' "$dir/pid" \
        "$JAVA" "${JVM_FLAGS[@]}" "-Dzookeeper.log.dir=$dir" -cp "$CLASSPATH_ZK" "$MAIN_CLASS" "${CFG[n]}" \
        >>"$dir/server.log" 2>&1 </dev/null 9>&- &
}

# Wait (up to 5 s) until the wrappers of the given servers have written their pid files.
wait_pid_files() {
    local n deadline
    deadline=$(($(now_ms) + 5000))
    for n in "$@"; do
        until [[ -s ${SDIR[n]}/pid ]]; do
            (($(now_ms) < deadline)) || die "server $n did not start (no pid file); see ${SDIR[n]}/server.log"
            sleep 0.02
        done
    done
}

# Stop the given servers: send SIGNAL (TERM or KILL), wait up to 10 s for them to exit,
# SIGKILL the rest, then wait until their client ports are closed.
stop_servers() {
    local sig=$1 n pid deadline left
    shift
    local -a targets=() pids=()
    for n in "$@"; do
        if pid=$(server_pid "$n"); then
            targets+=("$n")
            pids[n]=$pid
            kill -s "$sig" "$pid" 2>/dev/null || true
        fi
    done
    deadline=$(($(now_ms) + 10000))
    while :; do
        left=()
        for n in "${targets[@]}"; do
            is_our_server "${pids[n]}" "${CFG[n]}" && left+=("$n")
        done
        ((${#left[@]} == 0)) && break
        if (($(now_ms) >= deadline)); then
            if [[ $sig == KILL ]]; then
                die "server(s) ${left[*]} still alive after SIGKILL"
            fi
            log "server(s) ${left[*]} did not stop within 10 s of SIGTERM; sending SIGKILL"
            sig=KILL
            for n in "${left[@]}"; do kill -s KILL "${pids[n]}" 2>/dev/null || true; done
            deadline=$(($(now_ms) + 10000))
        fi
        sleep 0.1
    done
    for n in "$@"; do rm -f "${SDIR[n]}/pid"; done
    for n in "${targets[@]}"; do
        wait_port_closed "${CPORT[n]}" || true
        log "server $n stopped (pid ${pids[n]})"
    done
}

# ---------------------------------------------------------------------------------------
# Brokers: RabbitMQ and Redis on 127.0.0.1
# ---------------------------------------------------------------------------------------

# apt-get install for a package whose maintainer script would start a system-wide service
# (on the default port, as another user): a policy-rc.d that says "no" for the duration, when
# the machine has none of its own.
apt_install_no_start() {
    local policy=/usr/sbin/policy-rc.d made=0 status=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# zk-test.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made=1
    fi
    apt_install "$@" || status=$?
    ((made)) && rm -f "$policy"
    return "$status"
}

ensure_rabbitmq() {
    [[ -x $RABBIT_BIN/rabbitmq-server && -x $RABBIT_BIN/rabbitmqctl ]] && return 0
    if can_apt; then
        apt_install_no_start rabbitmq-server || die "could not install RabbitMQ (apt-get install rabbitmq-server failed)"
    fi
    [[ -x $RABBIT_BIN/rabbitmq-server ]] ||
        die "RabbitMQ not found in $RABBIT_BIN (Debian/Ubuntu: apt-get install rabbitmq-server; or set ZK_TEST_RABBITMQ_BIN)"
}

ensure_redis() {
    command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
    if can_apt; then
        apt_install_no_start redis-server || die "could not install Redis (apt-get install redis-server failed)"
    fi
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found (Debian/Ubuntu: apt-get install redis-server)"
}

# The environment of every RabbitMQ command (rabbitmq-server, rabbitmqctl...) for this test
# node: its own node name, cookie ($HOME/.erlang.cookie), folders, configuration and epmd,
# all bound to 127.0.0.1, and none of the system's /etc/rabbitmq files.
RABBIT_ENV=(
    "HOME=$RABBIT_DIR"
    "RABBITMQ_NODENAME=$RABBIT_NODE"
    "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
    "RABBITMQ_NODE_PORT=$AMQP_PORT"
    "RABBITMQ_DIST_PORT=$RABBIT_DIST_PORT"
    "RABBITMQ_CONF_ENV_FILE=$RABBIT_DIR/rabbitmq-env.conf"
    "RABBITMQ_CONFIG_FILE=$RABBIT_DIR/rabbitmq.conf"
    "RABBITMQ_ADVANCED_CONFIG_FILE=$RABBIT_DIR/advanced.config"
    "RABBITMQ_ENABLED_PLUGINS_FILE=$RABBIT_DIR/enabled_plugins"
    "RABBITMQ_MNESIA_BASE=$RABBIT_DIR/mnesia"
    "RABBITMQ_LOG_BASE=$RABBIT_DIR/log"
    "RABBITMQ_PID_FILE=$RABBIT_DIR/pid"
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
    "ERL_EPMD_PORT=$EPMD_PORT"
    "ERL_EPMD_ADDRESS=127.0.0.1"
)

rabbit_run() {
    local cmd=$1
    shift
    env "${RABBIT_ENV[@]}" "$RABBIT_BIN/$cmd" "$@"
}

# True when PID is alive (not a zombie) and its command line holds every one of the words:
# in one of its arguments, or as one whole argument for a word written "=word".
pid_runs() {
    local pid=$1 a w found
    shift
    local -a args=()
    is_uint "$pid" || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || return 1
    for w in "$@"; do
        found=0
        for a in "${args[@]}"; do
            if [[ $w == =* ]]; then [[ $a == "${w#=}" ]] && found=1; else [[ $a == *"$w"* ]] && found=1; fi
            ((found)) && break
        done
        ((found)) || return 1
    done
}

# Print the pid of a process whose command line holds every one of the words: the one in
# PIDFILE when it qualifies, else the first found in /proc (a broker still booting has not
# written its pid file yet, and one whose pid file was lost must not be started twice).
find_pid() {
    local pidfile=$1 pid="" d
    shift
    [[ -r $pidfile ]] && read -r pid <"$pidfile"
    if pid_runs "$pid" "$@"; then
        echo "$pid"
        return 0
    fi
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if pid_runs "$pid" "$@"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# The node's Erlang VM: its command line names its home, the node's own folder.
rabbitmq_pid() { find_pid "$RABBIT_DIR/pid" beam.smp "=$RABBIT_DIR"; }

# Redis shows "redis-server 127.0.0.1:PORT" as its command line, and works in its --dir:
# a Redis on that port started from another state folder is not this one.
redis_pid() {
    local pid
    pid=$(find_pid "$REDIS_DIR/pid" redis-server "127.0.0.1:$REDIS_PORT") || return 1
    [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$REDIS_DIR" ]] || return 1
    echo "$pid"
}

broker_pid() { "${1}_pid"; }

# Fail, naming the user, when one of the ports is taken by another program.
check_broker_ports() {
    local name=$1 port who bad=0
    shift
    for port in "$@"; do
        if who=$(port_user "$port"); then
            # Our own epmd, left by an earlier run of this node, may serve again.
            [[ $port == "$EPMD_PORT" && $who == epmd* ]] && continue
            log "error: port $port (needed by $name) is already in use by $who"
            bad=1
        fi
    done
    ((bad == 0)) || die "cannot start $name: move it with ZK_TEST_AMQP_PORT / ZK_TEST_REDIS_PORT" \
        "(RabbitMQ also uses AMQP port+20000 and ZK_TEST_EPMD_PORT)"
}

# Start RabbitMQ in the background (setsid + nohup, like the ZooKeeper servers); the caller
# waits with rabbitmq_wait. Its configuration is rewritten at each start.
rabbitmq_launch() {
    ensure_rabbitmq
    check_broker_ports RabbitMQ "$AMQP_PORT" "$RABBIT_DIST_PORT" "$EPMD_PORT"
    mkdir -p "$RABBIT_DIR/log"
    {
        echo "# Generated by zk-test.sh; rewritten each time this node is started."
        echo "listeners.tcp.1 = 127.0.0.1:$AMQP_PORT"
        echo "disk_free_limit.absolute = 50MB"
        echo "log.console = false"
        echo "log.file = rabbit.log"
        echo "log.file.level = warning"
    } >"$RABBIT_DIR/rabbitmq.conf"
    echo '[].' >"$RABBIT_DIR/enabled_plugins"
    : >"$RABBIT_DIR/rabbitmq-env.conf"
    rm -f "$RABBIT_DIR/pid"
    printf '==== zk-test.sh: starting RabbitMQ %s at %s\n' "$RABBIT_NODE" "$(date '+%Y-%m-%d %H:%M:%S')" \
        >>"$RABBIT_DIR/server.log"
    setsid nohup env "${RABBIT_ENV[@]}" "$RABBIT_BIN/rabbitmq-server" \
        >>"$RABBIT_DIR/server.log" 2>&1 </dev/null 9>&- &
    log "starting RabbitMQ on 127.0.0.1:$AMQP_PORT (node $RABBIT_NODE, data in $RABBIT_DIR)"
}

rabbitmq_wait() {
    local pid="" deadline
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    # rabbitmqctl wait needs the pid file, which the node writes early in its boot.
    until [[ -s $RABBIT_DIR/pid ]]; do
        if (($(now_ms) >= deadline)); then
            tail -n 20 "$RABBIT_DIR/server.log" >&2 || true
            die "RabbitMQ wrote no pid file within ${START_TIMEOUT}s; see $RABBIT_DIR/server.log"
        fi
        sleep 0.1
    done
    if ! rabbit_run rabbitmqctl -q wait --timeout "$START_TIMEOUT" "$RABBIT_DIR/pid" >/dev/null 2>&1 ||
        ! pid=$(rabbitmq_pid); then
        tail -n 20 "$RABBIT_DIR/server.log" >&2 || true
        die "RabbitMQ did not start; see $RABBIT_DIR/server.log and $RABBIT_DIR/log"
    fi
    log "RabbitMQ serves at $AMQP_URL (pid $pid)"
}

redis_launch() {
    ensure_redis
    check_broker_ports Redis "$REDIS_PORT"
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_DIR/pid"
    # No persistence: a test broker starts empty. Foreground under setsid, so that the pid
    # file is the server's own.
    setsid nohup redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" \
        --save '' --appendonly no --daemonize no --pidfile "$REDIS_DIR/pid" \
        --logfile "$REDIS_DIR/redis.log" >>"$REDIS_DIR/server.log" 2>&1 </dev/null 9>&- &
    log "starting Redis on 127.0.0.1:$REDIS_PORT (data in $REDIS_DIR)"
}

redis_wait() {
    local deadline pid
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    until [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && pid=$(redis_pid); do
        if (($(now_ms) >= deadline)); then
            tail -n 20 "$REDIS_DIR/redis.log" "$REDIS_DIR/server.log" >&2 2>/dev/null || true
            die "Redis did not answer within ${START_TIMEOUT}s; see $REDIS_DIR/redis.log"
        fi
        sleep 0.05
    done
    log "Redis serves at $REDIS_URL (pid $pid)"
}

rabbitmq_stop() {
    local pid
    if pid=$(rabbitmq_pid); then
        rabbit_run rabbitmqctl -q shutdown --timeout 20 >/dev/null 2>&1 || true
        stop_pid RabbitMQ "$pid"
        log "RabbitMQ stopped (pid $pid)"
    fi
    # The node's private epmd (when this folder has run the node): it refuses to go while
    # a node is registered with it.
    if [[ -d $RABBIT_DIR ]] && command -v epmd >/dev/null 2>&1 && port_user "$EPMD_PORT" >/dev/null; then
        ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true
    fi
    rm -f "$RABBIT_DIR/pid"
}

redis_stop() {
    local pid
    if pid=$(redis_pid); then
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        stop_pid Redis "$pid"
        log "Redis stopped (pid $pid)"
    fi
    rm -f "$REDIS_DIR/pid"
}

# Wait up to 10 s for PID to exit after a polite request; then SIGTERM, then SIGKILL.
stop_pid() {
    local name=$1 pid=$2 deadline sig
    for sig in none TERM KILL; do
        [[ $sig != none ]] && kill -s "$sig" "$pid" 2>/dev/null
        deadline=$(($(now_ms) + 10000))
        while kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; do
            (($(now_ms) < deadline)) || continue 2
            sleep 0.1
        done
        return 0
    done
    die "$name (pid $pid) is still alive after SIGKILL"
}

broker_url() {
    case $1 in
        rabbitmq) echo "$AMQP_URL" ;;
        redis) echo "$REDIS_URL" ;;
    esac
}

broker_log() {
    case $1 in
        rabbitmq) echo "$RABBIT_DIR/log/rabbit.log" ;;
        redis) echo "$REDIS_DIR/redis.log" ;;
    esac
}

# Start those of the named brokers that are not running, without waiting for them (so that
# they boot while ZooKeeper does); brokers_wait then waits for each and notes its URL.
brokers_launch() {
    local b
    for b in "$@"; do
        if broker_pid "$b" >/dev/null; then
            log "$b already running on 127.0.0.1 ($(broker_url "$b")); reusing it"
        else
            "${b}_launch"
        fi
    done
}

brokers_wait() {
    local b
    for b in "$@"; do
        "${b}_wait"
        broker_url "$b" >"$STATE_DIR/$b-url"
    done
}

cmd_start_brokers() {
    local b
    (($#)) || set -- "${BROKERS[@]}"
    check_broker_names "$@"
    take_lock
    mkdir -p "$STATE_DIR"
    brokers_launch "$@"
    brokers_wait "$@"
    for b in "$@"; do broker_url "$b"; done
}

cmd_stop_brokers() {
    local b
    (($#)) || set -- "${BROKERS[@]}"
    check_broker_names "$@"
    [[ -d $STATE_DIR ]] || return 0
    take_lock
    for b in "$@"; do "${b}_stop"; done
}

cmd_broker_status() {
    local b pid down=0
    for b in rabbitmq redis; do
        if pid=$(broker_pid "$b"); then
            printf '%-8s  running  pid %-7s  %s  log %s\n' "$b" "$pid" "$(broker_url "$b")" "$(broker_log "$b")"
        else
            printf '%-8s  down     %-11s  %s\n' "$b" "" "$(broker_url "$b")"
            down=1
        fi
    done
    return "$down"
}

# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

cmd_start() {
    local n t0 dt
    local -a down=()
    t0=$(now_ms)
    take_lock
    check_port_marker
    check_tls_mode
    for n in "${SERVERS[@]}"; do
        server_pid "$n" >/dev/null || down+=("$n")
    done
    # Ports first: it is the cheapest check and the likeliest failure.
    ((${#down[@]} == 0)) || check_ports_free "${down[@]}"
    # The brokers boot (RabbitMQ takes seconds) while the ensemble does.
    brokers_launch "${BROKERS[@]}"
    if ((${#down[@]})); then
        prepare_to_start
        for n in "${down[@]}"; do start_server "$n"; done
        wait_pid_files "${down[@]}"
        log "started server(s) ${down[*]} (ZooKeeper from $ZK_FROM); waiting for them to serve"
    else
        log "ensemble already running in $STATE_DIR; reusing it"
    fi
    wait_for all || exit 1
    brokers_wait "${BROKERS[@]}"
    hosts_string >"$STATE_DIR/hosts"
    if ((TLS)); then
        tls_hosts_string >"$STATE_DIR/tls-hosts"
        log "TLS: $(tls_hosts_string | head -n 1) (CA: $TLS_DIR/ca.pem; see tls-hosts)"
    fi
    dt=$(($(now_ms) - t0))
    log "ensemble ready in $((dt / 1000)).$(printf '%03d' $((dt % 1000)))s"
    hosts_string
}

cmd_stop() {
    local clean=0 b
    case ${1:-} in
        "") ;;
        --clean) clean=1 ;;
        *) die "unknown option for stop: $1" ;;
    esac
    if [[ ! -d $STATE_DIR ]]; then
        log "nothing to stop ($STATE_DIR does not exist)"
        return 0
    fi
    take_lock
    # --clean deletes the brokers' folders too: stop them whatever ZK_TEST_BROKERS says.
    if ((clean)); then BROKERS=(rabbitmq redis); fi
    for b in "${BROKERS[@]}"; do "${b}_stop"; done
    stop_servers TERM "${SERVERS[@]}"
    if ((clean)); then
        # Only delete a folder this script made (it holds the port marker or server dirs).
        if [[ -f $STATE_DIR/port || -f $STATE_DIR/1/zoo.cfg || $(basename -- "$STATE_DIR") == .zk-test* ]]; then
            rm -rf -- "$STATE_DIR"
            log "deleted $STATE_DIR"
        else
            die "$STATE_DIR does not look like a zk-test.sh state folder; not deleting it"
        fi
    fi
}

cmd_status() {
    probe_all
    print_status_lines
    quorum_serves
}

cmd_leader() {
    local n
    probe_all
    for n in "${SERVERS[@]}"; do
        if [[ ${MODES[n]} == leader ]]; then
            echo "$n"
            return 0
        fi
    done
    log "no leader"
    return 1
}

cmd_start_server() {
    local n=$1
    take_lock
    check_port_marker
    check_tls_mode
    if server_pid "$n" >/dev/null; then
        log "server $n is already running"
    else
        check_ports_free "$n"
        prepare_to_start
        start_server "$n"
        wait_pid_files "$n"
        log "started server $n; waiting for it to serve"
    fi
    wait_for "$n" || exit 1
}

main() {
    local cmd=${1:-start}
    (($#)) && shift
    case $cmd in
        start) (($# == 0)) || die "start takes no argument"; cmd_start ;;
        stop) cmd_stop "$@" ;;
        clean) cmd_stop --clean ;;
        status) cmd_status ;;
        leader) cmd_leader ;;
        wait) wait_for quorum ;;
        hosts) hosts_string ;;
        tls-hosts) cmd_tls_hosts ;;
        stop-server)
            check_server_arg "${1:-}"
            take_lock
            stop_servers TERM "$1"
            ;;
        kill-server)
            check_server_arg "${1:-}"
            take_lock
            stop_servers KILL "$1"
            ;;
        start-server)
            check_server_arg "${1:-}"
            cmd_start_server "$1"
            ;;
        start-brokers) cmd_start_brokers "$@" ;;
        stop-brokers) cmd_stop_brokers "$@" ;;
        broker-status) cmd_broker_status ;;
        broker-urls) printf '%s\n%s\n' "$AMQP_URL" "$REDIS_URL" ;;
        rabbitmqctl) rabbit_run rabbitmqctl "$@" ;;
        redis-cli) redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
