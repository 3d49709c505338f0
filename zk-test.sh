#!/usr/bin/env bash
# zk-test.sh: a throw-away 3-server ZooKeeper ensemble on 127.0.0.1 for zkcelery's tests,
# and beside it a RabbitMQ and a Redis for the tests that need a real Celery broker.
#
# Run with no argument to start everything (or reuse what already runs); the connection
# string is the last line on stdout. `./zk-test.sh --help` lists the commands.
#
# Why an ensemble and not one standalone server: the lock tests kill and restart servers
# (leader failover, session survival), which only a quorum of three can show.
#
# Six parts, in reading order: 1. common helpers; 2. getting ZooKeeper (and Java); 3. TLS
# material; 4. the ensemble; 5. the brokers; 6. the commands and main. A part uses its own
# functions and the common helpers; what it hands to a later part is named in its heading.
# Only the commands (part 6) call into several parts.

set -euo pipefail

# =========================================================================================
# 1. Common helpers: messages, settings, the state folder, processes, ports, packages
# =========================================================================================

log() { printf 'zk-test: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
have() { command -v "$1" >/dev/null 2>&1; }

now_ms() {
    # EPOCHREALTIME has microseconds; strip the locale's decimal separator.
    local t=${EPOCHREALTIME//[!0-9]/}
    echo $((10#$t / 1000))
}

# Run CMD every STEP seconds until it succeeds (return 0) or SECONDS have passed (return 1).
poll() {
    local deadline step=$2
    deadline=$(($(now_ms) + $1 * 1000))
    shift 2
    until "$@"; do
        (($(now_ms) < deadline)) || return 1
        sleep "$step"
    done
}

# Set VAR from the environment variable NAME (DEFAULT when unset or empty): a whole number
# from MIN to MAX, else die, saying WHY when given.
uint_setting() {
    local var=$1 name=$2 value=${!2:-$3} min=$4 max=$5 why=${6:+ ($6)}
    { is_uint "$value" && ((10#$value >= min && 10#$value <= max)); } ||
        die "$name must be a number from $min to $max$why, not '$value'"
    printf -v "$var" '%d' "$((10#$value))"
}

# Set VAR to 1 or 0 from the on/off environment variable NAME (DEFAULT when unset or empty).
flag_setting() {
    local var=$1 name=$2 value=${!2:-$3}
    case $value in
        1 | yes | true | on) printf -v "$var" 1 ;;
        0 | no | false | off) printf -v "$var" 0 ;;
        *) die "$name must be 1 (on) or 0 (off; default $3), not '$value'" ;;
    esac
}

SCRIPT_DIR=$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")
uint_setting START_TIMEOUT ZK_TEST_START_TIMEOUT 60 0 86400
# The ensemble's base port (part 4) is read here because it names the default state folder:
# ensembles on different ports never share pid files or data.
uint_setting BASE_PORT ZK_TEST_PORT 2181 1024 45532 "server 3's election port is base+20003"
if [[ -n ${ZK_TEST_DIR:-} ]]; then
    STATE_DIR=$(realpath -m -- "$ZK_TEST_DIR")
elif ((BASE_PORT == 2181)); then
    STATE_DIR=$SCRIPT_DIR/.zk-test
else
    STATE_DIR=$SCRIPT_DIR/.zk-test-$BASE_PORT
fi
[[ $STATE_DIR != / ]] || die "ZK_TEST_DIR must not be /"

# Commands that change the state folder lock it first, so that two test processes running
# this script at once do not both start servers. The lock is fd 9, which `launch` does not
# hand on: a server holding it would block every later command.
take_lock() {
    have flock || return 0
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w $((START_TIMEOUT + 60)) 9 || die "another zk-test.sh is still busy with $STATE_DIR"
}

# Start CMD detached (setsid + nohup), so that it outlives this script and the shell or CI
# step that ran it; its output is appended to LOG.
launch() {
    local log=$1
    shift
    setsid nohup "$@" >>"$log" 2>&1 </dev/null 9>&- &
}

# True when PID is alive and its command line holds each WORD: inside one of its arguments,
# or, for a word written "=word", as a whole argument. Reading the command line, not just
# `kill -0`, keeps a stale pid file (dead pid, or one reused by another program) from passing
# for our server; a zombie's command line is empty, so one nobody has reaped counts as gone.
pid_runs() {
    local pid=$1 word arg
    shift
    local -a args=()
    { is_uint "$pid" && kill -0 "$pid" 2>/dev/null; } || return 1
    mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || return 1
    ((${#args[@]})) || return 1
    for word in "$@"; do
        for arg in "${args[@]}"; do
            [[ $word == =* && $arg == "${word#=}" || $word != =* && $arg == *"$word"* ]] && continue 2
        done
        return 1
    done
}

pid_gone() { ! pid_runs "$1"; }

# Print the pid of a process whose command line holds each WORD (see pid_runs): the one in
# PIDFILE when it qualifies, else the first found in /proc, so that a process that has not
# written its pid file yet, or has lost it, is still found and never started twice.
find_pid() {
    local pidfile=$1 pid=""
    shift
    [[ ! -r $pidfile ]] || read -r pid <"$pidfile" || true
    for pid in "$pid" /proc/[0-9]*; do
        pid=${pid#/proc/}
        if pid_runs "$pid" "$@"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# Give PID 10 s to exit after each SIGNAL in turn ("-" sends none: the caller has already
# asked it to stop); die if it outlives the last one.
stop_pid() {
    local name=$1 pid=$2
    shift 2
    while (($#)); do
        [[ $1 == - ]] || kill -s "$1" "$pid" 2>/dev/null || true
        poll 10 0.1 pid_gone "$pid" && return 0
        shift
        if (($#)); then log "$name (pid $pid) still runs after 10 s; sending SIG$1"; fi
    done
    die "$name (pid $pid) is still alive after SIGKILL"
}

# Command line of a process, shortened, for messages.
proc_cmdline() {
    local -a args=()
    mapfile -d '' -t args 2>/dev/null <"/proc/$1/cmdline" || return 1
    local s="${args[*]}"
    ((${#s} > 160)) && s="${s:0:157}..."
    printf '%s' "$s"
}

# If something listens on PORT in a way that stops us binding 127.0.0.1:PORT, print who it
# is and return 0; return 1 when the port is free. `ss` names the process; without it, only
# connecting with bash's /dev/tcp can tell.
port_user() {
    local port=$1 listeners line pid name what
    if have ss && listeners=$(ss -Hltnp 2>/dev/null); then
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

port_free() { ! port_user "$1" >/dev/null; }

# Log each port (after its LABEL) that another program holds; fail if there was one.
ports_free() { # LABEL PORT [LABEL PORT]...
    local who status=0
    while (($# >= 2)); do
        if who=$(port_user "$2"); then
            log "error: port $2 ($1) is already in use by $who"
            status=1
        fi
        shift 2
    done
    return "$status"
}

APT_UPDATED=0

can_apt() { [[ $(id -u) == 0 ]] && have apt-get; }

# apt-get install, with one `apt-get update` first in a run that installs anything. No
# service starts meanwhile (a policy-rc.d that says no, unless the machine has its own):
# RabbitMQ's and Redis's packages would start system-wide servers on the default ports.
# Output goes to stderr: stdout is for what scripts read.
apt_install() {
    local policy=/usr/sbin/policy-rc.d made=0 status=0
    if ((!APT_UPDATED)); then
        log "running apt-get update"
        apt-get update >&2 || return 1
        APT_UPDATED=1
    fi
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# zk-test.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made=1
    fi
    log "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 || status=$?
    if ((made)); then rm -f "$policy"; fi
    return "$status"
}

# Make TEST (a command) pass: when it fails, install Debian's PACKAGE (as root, with apt-get)
# and try again; die naming WHAT when it still fails.
ensure_package() {
    local package=$1 what=$2
    shift 2
    "$@" && return 0
    if can_apt; then apt_install "$package" || log "warning: apt-get install $package failed"; fi
    "$@" || die "$what not found (Debian/Ubuntu: apt-get install $package)"
}

# =========================================================================================
# 2. Getting ZooKeeper (and Java): $ZOOKEEPER_PATH, Debian's package, or an Apache release
#
# get_zookeeper TLS (1 when the servers get a TLS port) sets ZK_JAVA, the command that runs
# ZooKeeper's classes (java, its logging flags, the classpath; the ensemble adds its flags
# and the main class), ZK_FROM, where ZooKeeper came from, for messages, and KEYTOOL, Java's
# keytool ("" when missing), which makes the TLS truststore.
# =========================================================================================

SOURCE=${ZK_TEST_SOURCE:-auto}
case $SOURCE in auto | path | debian | download) ;; *) die "ZK_TEST_SOURCE must be auto, path, debian or download" ;; esac

# The Apache release, used only when neither $ZOOKEEPER_PATH nor the Debian package is
# available. Its SHA-256 is pinned (the value two independent public build recipes publish
# for this tarball); no published SHA-512 was found to pin, so the .sha512 file Apache
# publishes beside the tarball is also checked, when it can be fetched.
readonly ZK_DL_VERSION=3.8.4
readonly ZK_DL_NAME="apache-zookeeper-${ZK_DL_VERSION}-bin"
readonly ZK_DL_URL="https://archive.apache.org/dist/zookeeper/zookeeper-${ZK_DL_VERSION}/${ZK_DL_NAME}.tar.gz"
readonly ZK_DL_SHA256=284cb4675adb64794c63d95bf202d265cebddc0cda86ac86fb0ede8049de9187

readonly DEB_ZK_JAR=/usr/share/java/zookeeper.jar
readonly DEB_SLF4J_SIMPLE=/usr/share/java/slf4j-simple.jar
# Debian's zookeeper.jar lists netty-handler, -buffer, -common, -transport and
# -transport-native-epoll in its manifest Class-Path, but not netty-codec, which
# NettyServerCnxnFactory (needed for secureClientPort) also uses: without it the servers
# start and bind their ports, yet drop every connection, plain or TLS, with
# "NoClassDefFoundError: io/netty/handler/codec/ByteToMessageDecoder" in server.log.
# (netty-resolver and netty-transport-native-unix-common were not needed: the JNI part of
# epoll is not packaged, so Netty uses NIO.) An Apache release's lib/ holds all of Netty.
readonly DEB_NETTY_CODEC=/usr/share/java/netty-codec.jar

readonly ZK_CACHE=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/zkcelery

declare -a ZK_JAVA=()
JAVA="" KEYTOOL="" ZK_FROM=""

get_zookeeper() {
    local tls=$1
    get_java
    if [[ $SOURCE == auto || $SOURCE == path ]] && [[ -n ${ZOOKEEPER_PATH:-} ]]; then
        apache_release "$ZOOKEEPER_PATH" ||
            die "ZOOKEEPER_PATH=$ZOOKEEPER_PATH is not an unpacked ZooKeeper release (no lib/zookeeper-*.jar)"
        use_apache_release "$(realpath -- "$ZOOKEEPER_PATH")"
    elif [[ $SOURCE == path ]]; then
        die "ZK_TEST_SOURCE=path but ZOOKEEPER_PATH is not set"
    elif [[ $SOURCE != download ]] && debian_zookeeper; then
        use_debian "$tls"
    elif [[ $SOURCE == debian ]]; then
        die "the Debian zookeeper package is not installed (and could not be installed: needs root and apt-get)"
    else
        download_zookeeper
        use_apache_release "$ZK_CACHE/$ZK_DL_NAME"
    fi
}

# Java from PATH, else $JAVA_HOME, else Debian's default-jre-headless; keytool beside it.
get_java() {
    if have java; then
        JAVA=$(command -v java)
    elif [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        JAVA=$JAVA_HOME/bin/java
    else
        ensure_package default-jre-headless "Java (put 'java' on PATH or set JAVA_HOME)" have java
        JAVA=$(command -v java)
    fi
    KEYTOOL=$(dirname -- "$(readlink -f -- "$JAVA")")/keytool
    [[ -x $KEYTOOL ]] || KEYTOOL=$(command -v keytool) || KEYTOOL=""
}

# Debian's zookeeper package, installed (as root) when missing.
debian_zookeeper() {
    debian_present && return 0
    can_apt || return 1
    apt_install zookeeper libslf4j-java || log "warning: apt-get install zookeeper failed"
    debian_present
}

debian_present() { [[ -f $DEB_ZK_JAR && -f $DEB_SLF4J_SIMPLE ]]; }

apache_release() {
    [[ -d $1/lib ]] || return 1
    compgen -G "$1/lib/zookeeper-[0-9]*.jar" >/dev/null || compgen -G "$1/zookeeper-[0-9]*.jar" >/dev/null
}

# An unpacked Apache release: its lib/ holds ZooKeeper, its dependencies and the logback
# binding; its conf/ holds logback.xml (without it logback logs at DEBUG).
use_apache_release() {
    ZK_JAVA=("$JAVA" -cp "$1/conf:$1/lib/*:$1/*")
    ZK_FROM="Apache release in $1"
}

# Debian's jar names no SLF4J binding: without one the server logs nothing. slf4j-simple
# logs to stderr, which goes to server.log. With TLS (argument 1), netty-codec too.
use_debian() {
    local classpath=$DEB_ZK_JAR:$DEB_SLF4J_SIMPLE
    if (($1)); then
        ensure_package libnetty-java "$DEB_NETTY_CODEC (for ZK_TEST_TLS=1)" test -f "$DEB_NETTY_CODEC"
        classpath+=:$DEB_NETTY_CODEC
    fi
    ZK_JAVA=("$JAVA" -Dorg.slf4j.simpleLogger.defaultLogLevel=info -Dorg.slf4j.simpleLogger.showDateTime=true
        "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS" -cp "$classpath")
    ZK_FROM="Debian package ($DEB_ZK_JAR)"
}

# The pinned release in the cache: the first time, download it, check it and unpack it.
download_zookeeper() {
    local dest=$ZK_CACHE/$ZK_DL_NAME tarball=$ZK_CACHE/$ZK_DL_NAME.tar.gz tmp
    apache_release "$dest" && return 0
    mkdir -p "$ZK_CACHE" || die "cannot create cache folder $ZK_CACHE"
    [[ -f $tarball && $(digest sha256 "$tarball") == "$ZK_DL_SHA256" ]] || fetch_tarball "$tarball"
    check_published_sha512 "$tarball"
    # Unpack beside the destination and rename, so that an interrupted unpack never looks valid.
    tmp=$(mktemp -d "$ZK_CACHE/unpack.XXXXXX")
    if ! tar -xzf "$tarball" -C "$tmp" || ! apache_release "$tmp/$ZK_DL_NAME"; then
        rm -rf "$tmp"
        die "could not unpack $ZK_DL_NAME/lib from $tarball"
    fi
    rm -rf "$dest"
    mv "$tmp/$ZK_DL_NAME" "$dest"
    rm -rf "$tmp"
    log "ZooKeeper $ZK_DL_VERSION unpacked in $dest"
}

digest() { "$1sum" "$2" | cut -d' ' -f1; } # ALGO FILE

# Download the pinned tarball to DEST, keeping it only when its SHA-256 is the pinned one.
fetch_tarball() {
    local dest=$1 got
    log "downloading $ZK_DL_URL"
    if ! fetch_url "$ZK_DL_URL" "$dest.part"; then
        rm -f "$dest.part"
        die "could not download ZooKeeper from $ZK_DL_URL (no network?). Install the Debian" \
            "'zookeeper' package, or unpack an Apache ZooKeeper release and set ZOOKEEPER_PATH to it."
    fi
    got=$(digest sha256 "$dest.part")
    if [[ $got != "$ZK_DL_SHA256" ]]; then
        rm -f "$dest.part"
        die "checksum mismatch for $ZK_DL_URL: SHA-256 is $got, expected $ZK_DL_SHA256; the file was deleted"
    fi
    mv -f "$dest.part" "$dest"
}

# The second check: the SHA-512 published beside the tarball, when it can be fetched.
check_published_sha512() {
    local tarball=$1 got want
    if fetch_url "$ZK_DL_URL.sha512" "$tarball.sha512" 2>/dev/null && want=$(published_sha512 "$tarball.sha512"); then
        got=$(digest sha512 "$tarball")
        if [[ $got != "$want" ]]; then
            rm -f "$tarball" "$tarball.sha512"
            die "checksum mismatch for $ZK_DL_URL: SHA-512 is $got, the published one is $want; the file was deleted"
        fi
    else
        log "warning: could not fetch or read $ZK_DL_URL.sha512; relying on the pinned SHA-256 only"
    fi
    rm -f "$tarball.sha512"
}

fetch_url() { # URL DEST
    if have curl; then
        curl -fsSL --retry 2 --connect-timeout 15 -o "$2" "$1"
    elif have wget; then
        wget -q -T 15 -t 3 -O "$2" "$1"
    else
        log "neither curl nor wget is installed"
        return 1
    fi
}

# The hex digest in an Apache .sha512 file, in either published layout: "<hex>  <file>"
# (sha512sum) or "<file>: 8A3F 29B5 ..." (gpg --print-md, split over lines).
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

# =========================================================================================
# 3. TLS material (ZK_TEST_TLS=1): a throw-away CA and a server certificate, made once
#
# make_tls_material KEYTOOL makes them in TLS_DIR. The ensemble's configuration names
# TLS_KEYSTORE, TLS_TRUSTSTORE and TLS_STORE_PASS; clients are given TLS_CA.
# =========================================================================================

readonly TLS_DIR=$STATE_DIR/tls TLS_STORE_PASS=zk-test-only
readonly TLS_CA=$TLS_DIR/ca.pem TLS_KEYSTORE=$TLS_DIR/keystore.p12 TLS_TRUSTSTORE=$TLS_DIR/truststore.p12
readonly TLS_FILES=(ca.pem ca-key.pem server.pem server-key.pem keystore.p12 truststore.p12)

# The CA (ca.pem, ca-key.pem); a certificate for 127.0.0.1 and localhost signed by it
# (server.pem, server-key.pem); for the Java side, a PKCS12 keystore (server key and chain)
# and truststore (the CA), both with the password TLS_STORE_PASS. All is made in a temporary
# folder and moved in at the end, so that an interrupted run never leaves half a set.
make_tls_material() {
    local keytool=$1 tmp f
    tls_material_made && return 0
    ensure_package openssl "openssl (for ZK_TEST_TLS=1)" have openssl
    [[ -n $keytool ]] || die "keytool (part of the Java runtime) not found; it makes the TLS truststore"
    mkdir -p "$STATE_DIR"
    tmp=$(mktemp -d "$STATE_DIR/tls.tmp.XXXXXX")
    log "making a throw-away CA and server certificate in $TLS_DIR"
    if ! (cd "$tmp" && make_ca && make_server_cert && make_java_stores "$keytool") >"$tmp/make.log" 2>&1; then
        cat "$tmp/make.log" >&2
        rm -rf "$tmp"
        die "could not make the TLS certificates (see the output above)"
    fi
    mkdir -p "$TLS_DIR"
    for f in "${TLS_FILES[@]}"; do mv -f "$tmp/$f" "$TLS_DIR/$f"; done
    rm -rf "$tmp"
}

tls_material_made() {
    local f
    for f in "${TLS_FILES[@]}"; do [[ -s $TLS_DIR/$f ]] || return 1; done
}

make_ca() {
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
        -subj "/CN=zk-test.sh throw-away CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca-key.pem -out ca.pem &&
        chmod 600 ca-key.pem
}

make_server_cert() {
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
        -keyout server-key.pem -out server.csr &&
        chmod 600 server-key.pem &&
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth,clientAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext &&
        openssl x509 -req -sha256 -days 3650 -in server.csr -CA ca.pem -CAkey ca-key.pem \
            -set_serial "0x$(openssl rand -hex 16)" -extfile server.ext -out server.pem
}

# keytool, not openssl, makes the truststore: Java only trusts PKCS12 certificate entries
# that carry its own "trusted" attribute, which openssl 3.0 cannot write.
make_java_stores() {
    openssl pkcs12 -export -name server -in server.pem -inkey server-key.pem \
        -certfile ca.pem -out keystore.p12 -passout "pass:$TLS_STORE_PASS" &&
        "$1" -importcert -noprompt -alias ca -file ca.pem -storetype PKCS12 \
            -keystore truststore.p12 -storepass "$TLS_STORE_PASS"
}

# =========================================================================================
# 4. The ensemble: configuration, start, stop, faults, status
#
# Runs ZooKeeper with ZK_JAVA and ZK_FROM (part 2), and with ZK_TEST_TLS=1 gives the servers
# the TLS material (part 3).
# =========================================================================================

readonly MAIN_CLASS=org.apache.zookeeper.server.quorum.QuorumPeerMain
readonly SERVERS=(1 2 3)
flag_setting STOCK ZK_TEST_STOCK 0
if ((STOCK)); then uint_setting TICK ZK_TEST_TICK 2000 1 60000; else uint_setting TICK ZK_TEST_TICK 200 1 60000; fi
flag_setting TLS ZK_TEST_TLS 0
flag_setting TTL ZK_TEST_TTL 1
flag_setting PEER_PROXIES ZK_TEST_PEER_PROXIES 0
((!PEER_PROXIES || BASE_PORT <= 45502)) || die "with ZK_TEST_PEER_PROXIES=1, ZK_TEST_PORT must be at most 45502 (the last proxy's port is base+20033)"

declare -a CPORT=() SPORT=() QPORT=() EPORT=() SDIR=() CFG=()
for n in "${SERVERS[@]}"; do
    CPORT[n]=$((BASE_PORT + n - 1))
    SPORT[n]=$((BASE_PORT + 100 + n - 1))
    QPORT[n]=$((BASE_PORT + 10000 + n))
    EPORT[n]=$((BASE_PORT + 20000 + n))
    SDIR[n]=$STATE_DIR/$n
    CFG[n]=$STATE_DIR/$n/zoo.cfg
done
unset n

# With ZK_TEST_PEER_PROXIES=1 server I reaches server J (J != I) through a TCP proxy for
# the directed link I->J that the test process runs (testsupport.PeerNetwork): server I's
# configuration lists J at J's quorum and election ports plus 10*I. A server binds the ports
# of its own server.N line only, so each one lists itself at its real ports. Print one line
# per directed link: I J, then the proxy's and the server's quorum ports, then election's.
peer_port() { echo $(($2 + 10 * $1)); } # I PORT: where server I reaches the server PORT is of

peer_links() {
    local i j
    for i in "${SERVERS[@]}"; do
        for j in "${SERVERS[@]}"; do
            ((i == j)) || echo "$i $j $(peer_port "$i" "${QPORT[j]}") ${QPORT[j]} $(peer_port "$i" "${EPORT[j]}") ${EPORT[j]}"
        done
    done
}

# Containers (zkcelery's lock parents) are reaped quickly, so that the tests see it. TTL
# nodes are on for the tests (ZK_TEST_TTL=1), off as in ZooKeeper's default otherwise.
JVM_FLAGS=(-Xmx192m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto
    -Dznode.container.checkIntervalMs=200 -Dznode.container.maxPerMinute=100000
    -Dzookeeper.admin.enableServer=false)
if ((TTL)); then JVM_FLAGS+=(-Dzookeeper.extendedTypesEnabled=true); fi
if [[ ${ZK_TEST_FORCE_SYNC:-yes} == no ]]; then JVM_FLAGS+=(-Dzookeeper.forceSync=no); fi

hosts_string() {
    local n out=""
    for n in "${SERVERS[@]}"; do out+="${out:+,}127.0.0.1:${CPORT[n]}"; done
    echo "$out"
}

# Two lines: the TLS connection string, then the CA file that signed the servers' certificate.
tls_hosts_string() {
    local n out=""
    for n in "${SERVERS[@]}"; do out+="${out:+,}127.0.0.1:${SPORT[n]}"; done
    printf '%s\n%s\n' "$out" "$TLS_CA"
}

# The configuration, rewritten at each start:
# - sessions: the minimum stays at its default, 2 ticks; longer ones are capped at 5 s, as
#   some production ensembles cap them: the tests show that zkcelery times a lost lease from
#   the timeout the server granted, not the one it asked for;
# - a static ensemble: no reconfig, which would also make ZooKeeper rewrite this file;
# - autopurge keeps the newest 3 snapshots (and the logs they need) and purges at start,
#   then every hour, so that the data folders do not grow from run to run;
# - with ZK_TEST_TLS=1, a TLS client port beside the plain one, with server-side TLS only
#   (clients need no certificate). ZooKeeper turns the keys it does not know
#   (serverCnxnFactory, ssl.*) into "zookeeper." system properties, which is where the Netty
#   factory reads them.
write_config() {
    local n=$1 m dir=${SDIR[$1]}
    mkdir -p "$dir/data"
    echo "$n" >"$dir/data/myid"
    {
        cat <<EOF
# Generated by zk-test.sh; rewritten each time this server is started.
tickTime=$TICK
dataDir=$dir/data
clientPort=${CPORT[n]}
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=*
reconfigEnabled=false
standaloneEnabled=false
autopurge.snapRetainCount=3
autopurge.purgeInterval=1
EOF
        # Stock timing (ZK_TEST_STOCK=1): ZooKeeper's sample limits and its default session
        # bounds (2 to 20 ticks).
        if ((STOCK)); then printf '%s\n' initLimit=10 syncLimit=5; else printf '%s\n' initLimit=100 syncLimit=25 maxSessionTimeout=5000; fi
        for m in "${SERVERS[@]}"; do
            if ((PEER_PROXIES && m != n)); then
                echo "server.$m=127.0.0.1:$(peer_port "$n" "${QPORT[m]}"):$(peer_port "$n" "${EPORT[m]}")"
            else
                echo "server.$m=127.0.0.1:${QPORT[m]}:${EPORT[m]}"
            fi
        done
        if ((PEER_PROXIES)); then echo "# peers through proxies"; fi
        ((TLS == 0)) || cat <<EOF
secureClientPort=${SPORT[n]}
secureClientPortAddress=127.0.0.1
serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
ssl.keyStore.location=$TLS_KEYSTORE
ssl.keyStore.password=$TLS_STORE_PASS
ssl.keyStore.type=PKCS12
ssl.trustStore.location=$TLS_TRUSTSTORE
ssl.trustStore.password=$TLS_STORE_PASS
ssl.trustStore.type=PKCS12
ssl.clientAuth=none
EOF
    } >"$dir/zoo.cfg.tmp"
    mv -f "$dir/zoo.cfg.tmp" "${CFG[n]}"
}

# Print the pid of server N when it runs: the JVM whose command line names our main class
# and N's configuration file.
server_pid() { find_pid "${SDIR[$1]}/pid" "=$MAIN_CLASS" "=${CFG[$1]}"; }

# Set DOWN to those of servers N... that are not running, after checking that they may
# start: the state folder is not another base port's, the running servers have the same
# ZK_TEST_TLS, and the ports of the servers down are free. Dies otherwise.
find_down_servers() {
    local n
    DOWN=()
    check_port_marker
    check_tls_mode
    for n in "$@"; do server_pid "$n" >/dev/null || DOWN+=("$n"); done
    ((${#DOWN[@]} == 0)) || check_ports_free "${DOWN[@]}"
}

# The state folder remembers its base port, so that a folder shared by two ZK_TEST_PORT
# values (same ZK_TEST_DIR) does not mix two ensembles: the other's servers, named by the
# same configuration paths, would pass for ours.
check_port_marker() {
    local recorded n
    [[ -f $STATE_DIR/port ]] || return 0
    read -r recorded <"$STATE_DIR/port" || return 0
    [[ $recorded == "$BASE_PORT" ]] && return 0
    for n in "${SERVERS[@]}"; do
        server_pid "$n" >/dev/null &&
            die "$STATE_DIR is used by an ensemble running on base port $recorded; stop it" \
                "(ZK_TEST_PORT=$recorded $0 stop) or set ZK_TEST_DIR to another folder"
    done
    return 0
}

# Reusing servers started with the other ZK_TEST_TLS would give an ensemble without the TLS
# port asked for, or one with TLS on some servers only; likewise ZK_TEST_PEER_PROXIES.
check_tls_mode() {
    local n had name line asked
    for n in "${SERVERS[@]}"; do
        server_pid "$n" >/dev/null || continue
        for name in TLS PEER_PROXIES; do
            line='^secureClientPort='
            [[ $name == TLS ]] || line='^# peers through proxies'
            had=0
            if grep -q "$line" "${CFG[n]}" 2>/dev/null; then had=1; fi
            asked=${!name}
            ((had != asked)) || continue
            die "ZK_TEST_$name=$asked but server $n was started with ZK_TEST_$name=$had ($STATE_DIR). Use" \
                "the same value as when it was started, or stop it ($0 stop), or use another ZK_TEST_PORT and ZK_TEST_DIR."
        done
    done
}

check_ports_free() {
    local n
    local -a ports=()
    for n in "$@"; do
        ports+=("client port of server $n" "${CPORT[n]}" "quorum port of server $n" "${QPORT[n]}"
            "election port of server $n" "${EPORT[n]}")
        if ((TLS)); then ports+=("TLS-client port of server $n" "${SPORT[n]}"); fi
    done
    ports_free "${ports[@]}" ||
        die "cannot start ZooKeeper: needed ports are taken by other programs. Stop them, or" \
            "use other ports with ZK_TEST_PORT=<base> (server N uses base+N-1, base+10000+N, base+20000+N," \
            "and base+100+N-1 with ZK_TEST_TLS=1)."
}

# Start servers N..., detached, and return once each JVM runs (its pid file is written). A
# small bash wrapper writes its own pid and then execs java, so that the pid file holds the
# JVM's pid even if setsid had to fork.
start_servers() {
    local n dir
    mkdir -p "$STATE_DIR"
    echo "$BASE_PORT" >"$STATE_DIR/port"
    for n in "$@"; do
        dir=${SDIR[n]}
        write_config "$n"
        rm -f "$dir/pid"
        printf '==== zk-test.sh: starting server %s at %s (ZooKeeper from %s)\n' \
            "$n" "$(date '+%Y-%m-%d %H:%M:%S')" "$ZK_FROM" >>"$dir/server.log"
        # shellcheck disable=SC2016  # $$ and $@ are for the inner bash
        launch "$dir/server.log" bash -c 'echo $$ >"$0" && exec "$@"' "$dir/pid" \
            "${ZK_JAVA[@]}" "${JVM_FLAGS[@]}" "-Dzookeeper.log.dir=$dir" "$MAIN_CLASS" "${CFG[n]}"
    done
    for n in "$@"; do
        poll 5 0.02 test -s "${SDIR[n]}/pid" ||
            die "server $n did not start (no pid file); see ${SDIR[n]}/server.log"
    done
}

# Stop servers N...: send SIGNAL (TERM, or KILL for a crash) to all at once, then SIGKILL
# those still running after 10 s; return once their client ports are closed.
stop_servers() {
    local sig=$1 n pid
    shift
    local -a pids=() then=(- KILL)
    [[ $sig != KILL ]] || then=(-)
    for n in "$@"; do
        if pid=$(server_pid "$n"); then
            pids[n]=$pid
            kill -s "$sig" "$pid" 2>/dev/null || true
        fi
    done
    for n in "${!pids[@]}"; do stop_pid "server $n" "${pids[n]}" "${then[@]}"; done
    for n in "$@"; do rm -f "${SDIR[n]}/pid"; done
    for n in "${!pids[@]}"; do
        poll 10 0.1 port_free "${CPORT[n]}" || log "warning: port ${CPORT[n]} still in use after 10 s"
        log "server $n stopped (pid ${pids[n]})"
    done
}

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

# Mode of the server on PORT: leader, follower, observer, standalone, or "not serving" (no
# answer yet, or up but without a quorum).
zk_mode() {
    local out
    if out=$(zk_4lw "$1" srvr) && [[ $out =~ Mode:\ ([a-z]+) ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo "not serving"
    fi
}

declare -a PIDS=() MODES=() DOWN=()
WHY=""

# Fill PIDS[n] (empty when down) and MODES[n] (down, not serving, leader, follower...).
probe_all() {
    local n
    for n in "${SERVERS[@]}"; do
        if PIDS[n]=$(server_pid "$n"); then
            MODES[n]=$(zk_mode "${CPORT[n]}")
        else
            PIDS[n]="" MODES[n]=down
        fi
    done
}

is_serving_mode() { [[ $1 == leader || $1 == follower || $1 == observer ]]; }

# After probe_all: a quorum serves when a leader is up and at least two servers (the leader
# included) are leader or follower.
quorum_serves() {
    local n leaders=0 serving=0
    for n in "${SERVERS[@]}"; do
        [[ ${MODES[n]} == leader ]] && leaders=$((leaders + 1))
        [[ ${MODES[n]} == leader || ${MODES[n]} == follower ]] && serving=$((serving + 1))
    done
    ((leaders >= 1 && serving >= 2))
}

# After probe_all: print the number of the leader; fail if there is none.
leader_number() {
    local n
    for n in "${SERVERS[@]}"; do
        if [[ ${MODES[n]} == leader ]]; then
            echo "$n"
            return 0
        fi
    done
    return 1
}

print_status_lines() {
    local n
    for n in "${SERVERS[@]}"; do
        printf 'server %s  127.0.0.1:%-5s  %-11s  pid %-7s  log %s\n' \
            "$n" "${CPORT[n]}" "${MODES[n]}" "${PIDS[n]:--}" "${SDIR[n]}/server.log"
    done
}

# Wait until TARGET is reached: "quorum", "all" (every server serves, and a quorum does) or a
# server number (that server serves). Gives up at once when it no longer can be (too few
# server processes alive), after ZK_TEST_START_TIMEOUT seconds otherwise; either way it
# shows the end of each server's log.
wait_for() {
    local target=$1 n
    poll "$START_TIMEOUT" 0.15 settled "$target" || WHY="timed out after ${START_TIMEOUT}s (ZK_TEST_START_TIMEOUT)"
    [[ -n $WHY ]] || return 0
    case $target in
        quorum) log "no quorum: $WHY" ;;
        all) log "ensemble not ready: $WHY" ;;
        *) log "server $target not serving: $WHY" ;;
    esac
    print_status_lines >&2
    for n in "${SERVERS[@]}"; do
        [[ -f ${SDIR[n]}/server.log ]] || continue
        printf '\n----- server %s: last lines of %s -----\n' "$n" "${SDIR[n]}/server.log" >&2
        tail -n 15 "${SDIR[n]}/server.log" >&2 || true
    done
    printf '\n' >&2
    return 1
}

# Probe the servers: true when TARGET is reached (WHY empty) or can no longer be (WHY says why).
settled() {
    local n alive=0
    probe_all
    WHY=""
    target_reached "$1" && return 0
    for n in "${SERVERS[@]}"; do [[ -z ${PIDS[n]} ]] || alive=$((alive + 1)); done
    case $1 in
        quorum) ((alive >= 2)) || WHY="only $alive of 3 servers are running; a quorum needs 2" ;;
        all) ((alive == 3)) || WHY="only $alive of 3 servers are running (a server exited?)" ;;
        *) [[ -n ${PIDS[$1]} ]] || WHY="server $1 is not running (it exited?)" ;;
    esac
    [[ -n $WHY ]]
}

# After probe_all: is TARGET (see wait_for) reached?
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


# =========================================================================================
# 5. The brokers: RabbitMQ and Redis on 127.0.0.1, from Debian's packages
#
# Each runs from its own folder in the state folder, named after its port, so that two of
# them on different ports never share data, pid files or (RabbitMQ) an Erlang cookie.
# =========================================================================================

# RabbitMQ's Erlang distribution port is the AMQP port plus 20000 (RabbitMQ's own rule),
# and it gets an epmd of its own on the AMQP port plus 10000, not the system's on 4369, so
# that it shares nothing with another RabbitMQ. (Plus 10000, not plus 20001: that is the
# distribution port of a RabbitMQ on the next AMQP port.)
uint_setting AMQP_PORT ZK_TEST_AMQP_PORT 5672 1024 45535 "its distribution port is AMQP port+20000"
uint_setting REDIS_PORT ZK_TEST_REDIS_PORT 6379 1024 65535
uint_setting EPMD_PORT ZK_TEST_EPMD_PORT $((AMQP_PORT + 10000)) 1024 65535
readonly RABBIT_DIST_PORT=$((AMQP_PORT + 20000))
readonly RABBIT_NODE=zk-test-$AMQP_PORT@localhost
readonly RABBIT_DIR=$STATE_DIR/rabbitmq-$AMQP_PORT
readonly RABBIT_BIN=${ZK_TEST_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
readonly REDIS_DIR=$STATE_DIR/redis-$REDIS_PORT
readonly AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT//
readonly REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0

check_broker_names() {
    local b
    for b in "$@"; do
        [[ $b == rabbitmq || $b == redis ]] ||
            die "unknown broker '$b' (expected rabbitmq or redis; ZK_TEST_BROKERS=none for neither)"
    done
}

# The brokers that start and stop handle besides the ensemble.
declare -a BROKERS=()
read -r -a BROKERS <<<"${ZK_TEST_BROKERS-rabbitmq redis}"
if [[ ${BROKERS[*]:-} == none || ${BROKERS[*]:-} == 0 ]]; then BROKERS=(); fi
check_broker_names "${BROKERS[@]}"

# The environment of every RabbitMQ command (rabbitmq-server, rabbitmqctl...) for this test
# node: its own node name, cookie ($HOME/.erlang.cookie), folders and configuration, all
# bound to 127.0.0.1, and none of the system's /etc/rabbitmq files; its epmd port is added
# by rabbit_run and rabbitmq_launch.
readonly RABBIT_ENV=(
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
    "ERL_EPMD_ADDRESS=127.0.0.1"
)

# Run a RabbitMQ command against the node through the epmd that it registered with.
rabbit_run() {
    local cmd=$1
    shift
    env "${RABBIT_ENV[@]}" "ERL_EPMD_PORT=$(rabbit_epmd_port)" "$RABBIT_BIN/$cmd" "$@"
}

# The running node's epmd port, read from its environment, else EPMD_PORT: a node started
# with another ZK_TEST_EPMD_PORT, or by a zk-test.sh from before the default moved from AMQP
# port+20001 to +10000, is still reached and stopped.
rabbit_epmd_port() {
    local pid port=""
    if pid=$(rabbitmq_pid); then
        port=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^ERL_EPMD_PORT=//p')
    fi
    echo "${port:-$EPMD_PORT}"
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

broker_pid() { "${1}_pid"; }

# The node's Erlang VM: its command line names its home, the node's own folder.
rabbitmq_pid() { find_pid "$RABBIT_DIR/pid" beam.smp "=$RABBIT_DIR"; }

# Redis shows "redis-server 127.0.0.1:PORT" as its command line, and works in its --dir: a
# Redis on that port started from another state folder is not this one.
redis_pid() {
    local pid
    pid=$(find_pid "$REDIS_DIR/pid" redis-server "127.0.0.1:$REDIS_PORT") || return 1
    [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$REDIS_DIR" ]] || return 1
    echo "$pid"
}

# Start those of the named brokers that are not running, without waiting for them (so that
# they boot while ZooKeeper does); brokers_wait then waits for each.
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
    for b in "$@"; do "${b}_wait"; done
}

brokers_stop() {
    local b
    for b in "$@"; do "${b}_stop"; done
}

# One line per broker; fail if one is down.
broker_status_lines() {
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

# Fail, naming each port's user, when a port the broker NAME needs (LABEL PORT pairs) is
# taken.
check_broker_ports() {
    local name=$1
    shift
    ports_free "$@" || die "cannot start $name: move it with ZK_TEST_AMQP_PORT / ZK_TEST_REDIS_PORT" \
        "(RabbitMQ also uses AMQP port+20000 and ZK_TEST_EPMD_PORT)"
}

rabbitmq_installed() { [[ -x $RABBIT_BIN/rabbitmq-server && -x $RABBIT_BIN/rabbitmqctl ]]; }

# Start RabbitMQ, detached; rabbitmq_wait waits for it. Its configuration is rewritten at
# each start.
rabbitmq_launch() {
    local who
    local -a ports=("needed by RabbitMQ" "$AMQP_PORT" "needed by RabbitMQ" "$RABBIT_DIST_PORT")
    ensure_package rabbitmq-server "RabbitMQ in $RABBIT_BIN (or set ZK_TEST_RABBITMQ_BIN)" rabbitmq_installed
    # The node's own epmd, left by an earlier run, may serve again.
    if ! who=$(port_user "$EPMD_PORT") || [[ $who != epmd* ]]; then ports+=("needed by RabbitMQ" "$EPMD_PORT"); fi
    check_broker_ports RabbitMQ "${ports[@]}"
    mkdir -p "$RABBIT_DIR/log"
    cat >"$RABBIT_DIR/rabbitmq.conf" <<EOF
# Generated by zk-test.sh; rewritten each time this node is started.
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
disk_free_limit.absolute = 50MB
log.console = false
log.file = rabbit.log
log.file.level = warning
EOF
    echo '[].' >"$RABBIT_DIR/enabled_plugins"
    : >"$RABBIT_DIR/rabbitmq-env.conf"
    rm -f "$RABBIT_DIR/pid"
    printf '==== zk-test.sh: starting RabbitMQ %s at %s\n' "$RABBIT_NODE" "$(date '+%Y-%m-%d %H:%M:%S')" \
        >>"$RABBIT_DIR/server.log"
    launch "$RABBIT_DIR/server.log" env "${RABBIT_ENV[@]}" "ERL_EPMD_PORT=$EPMD_PORT" "$RABBIT_BIN/rabbitmq-server"
    log "starting RabbitMQ on 127.0.0.1:$AMQP_PORT (node $RABBIT_NODE, data in $RABBIT_DIR)"
}

# `rabbitmqctl wait` needs the pid file, which the node writes early in its boot.
rabbitmq_wait() {
    local pid
    if ! poll "$START_TIMEOUT" 0.1 test -s "$RABBIT_DIR/pid"; then
        tail -n 20 "$RABBIT_DIR/server.log" >&2 || true
        die "RabbitMQ wrote no pid file within ${START_TIMEOUT}s; see $RABBIT_DIR/server.log"
    fi
    if ! rabbit_run rabbitmqctl -q wait --timeout "$START_TIMEOUT" "$RABBIT_DIR/pid" >/dev/null 2>&1 ||
        ! pid=$(rabbitmq_pid); then
        tail -n 20 "$RABBIT_DIR/server.log" >&2 || true
        die "RabbitMQ did not start; see $RABBIT_DIR/server.log and $RABBIT_DIR/log"
    fi
    log "RabbitMQ serves at $AMQP_URL (pid $pid)"
}

# Stop the node, then its epmd, which refuses to go while a node is registered with it.
rabbitmq_stop() {
    local pid epmd_port
    epmd_port=$(rabbit_epmd_port)
    if pid=$(rabbitmq_pid); then
        rabbit_run rabbitmqctl -q shutdown --timeout 20 >/dev/null 2>&1 || true
        stop_pid RabbitMQ "$pid" - TERM KILL
        log "RabbitMQ stopped (pid $pid)"
    fi
    if [[ -d $RABBIT_DIR ]] && have epmd && ! port_free "$epmd_port"; then
        ERL_EPMD_PORT=$epmd_port epmd -kill >/dev/null 2>&1 || true
    fi
    rm -f "$RABBIT_DIR/pid"
}

redis_installed() { have redis-server && have redis-cli; }

# No persistence: a test broker starts empty. In the foreground (under setsid), so that the
# pid file is the server's own.
redis_launch() {
    ensure_package redis-server redis-server redis_installed
    check_broker_ports Redis "needed by Redis" "$REDIS_PORT"
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_DIR/pid"
    launch "$REDIS_DIR/server.log" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
        --dir "$REDIS_DIR" --save '' --appendonly no --daemonize no --pidfile "$REDIS_DIR/pid" \
        --logfile "$REDIS_DIR/redis.log"
    log "starting Redis on 127.0.0.1:$REDIS_PORT (data in $REDIS_DIR)"
}

redis_serves() { [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && redis_pid >/dev/null; }

redis_wait() {
    if ! poll "$START_TIMEOUT" 0.05 redis_serves; then
        tail -n 20 "$REDIS_DIR/redis.log" "$REDIS_DIR/server.log" >&2 2>/dev/null || true
        die "Redis did not answer within ${START_TIMEOUT}s; see $REDIS_DIR/redis.log"
    fi
    log "Redis serves at $REDIS_URL (pid $(redis_pid))"
}

redis_stop() {
    local pid
    if pid=$(redis_pid); then
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        stop_pid Redis "$pid" - TERM KILL
        log "Redis stopped (pid $pid)"
    fi
    rm -f "$REDIS_DIR/pid"
}

# =========================================================================================
# 6. The commands and main
# =========================================================================================

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
  peer-links        one line per directed link I->J between servers: I J, the port of the
                    proxy server I reaches J's quorum port through with ZK_TEST_PEER_PROXIES=1
                    and that port, then the same for the election port
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
  ZK_TEST_STOCK          1 for ZooKeeper's stock timing: tickTime 2000 (unless ZK_TEST_TICK),
                         initLimit 10, syncLimit 5 (its sample configuration) and the default
                         session bounds, 2 to 20 ticks (default 0: initLimit 100, syncLimit 25,
                         sessions capped at 5 s)
  ZK_TEST_PEER_PROXIES   1 to make server I reach each other server J through a proxy for the
                         link I->J, on J's quorum and election ports plus 10*I (peer-links
                         lists them), which the caller runs (python testsupport.py peers);
                         every server binds only its own ports (default 0, off)
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
  JAVA_HOME              the Java to run ZooKeeper with, when there is no java on PATH
  ZK_TEST_BROKERS        the brokers that start and stop handle besides the ensemble:
                         "rabbitmq redis" (default), one of them, or "none"
  ZK_TEST_AMQP_PORT      RabbitMQ's AMQP port on 127.0.0.1 (default 5672). Its Erlang
                         distribution port is this plus 20000 (RabbitMQ's own rule); its node
                         name is zk-test-PORT@localhost
  ZK_TEST_EPMD_PORT      the port of RabbitMQ's own epmd (default: AMQP port plus 10000), so
                         that it shares nothing with another RabbitMQ
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

check_server_arg() {
    [[ ${1:-} =~ ^[123]$ ]] || die "expected a server number 1, 2 or 3, got '${1:-}'"
}

# What servers need before they start: ZooKeeper and Java, and the TLS material if asked for.
prepare_servers() {
    get_zookeeper "$TLS"
    ((TLS == 0)) || make_tls_material "$KEYTOOL"
}

cmd_start() {
    local t0 dt
    t0=$(now_ms)
    take_lock
    find_down_servers "${SERVERS[@]}"
    # The brokers boot (RabbitMQ takes seconds) while the ensemble does.
    brokers_launch "${BROKERS[@]}"
    if ((${#DOWN[@]})); then
        prepare_servers
        start_servers "${DOWN[@]}"
        log "started server(s) ${DOWN[*]} (ZooKeeper from $ZK_FROM); waiting for them to serve"
    else
        log "ensemble already running in $STATE_DIR; reusing it"
    fi
    wait_for all || exit 1
    brokers_wait "${BROKERS[@]}"
    hosts_string >"$STATE_DIR/hosts"
    if ((TLS)); then
        tls_hosts_string >"$STATE_DIR/tls-hosts"
        log "TLS: $(tls_hosts_string | head -n 1) (CA: $TLS_CA; see tls-hosts)"
    fi
    dt=$(($(now_ms) - t0))
    log "ensemble ready in $((dt / 1000)).$(printf '%03d' $((dt % 1000)))s"
    hosts_string
}

cmd_start_server() {
    local n=$1
    take_lock
    find_down_servers "$n"
    if ((${#DOWN[@]})); then
        prepare_servers
        start_servers "$n"
        log "started server $n; waiting for it to serve"
    else
        log "server $n is already running"
    fi
    wait_for "$n" || exit 1
}

cmd_stop() {
    local clean=0
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
    # --clean deletes the brokers' folders too: it stops them whatever ZK_TEST_BROKERS says.
    if ((clean)); then brokers_stop rabbitmq redis; else brokers_stop "${BROKERS[@]}"; fi
    stop_servers TERM "${SERVERS[@]}"
    ((clean)) || return 0
    # Only delete a folder this script made (it holds the port marker or server dirs).
    if [[ -f $STATE_DIR/port || -f $STATE_DIR/1/zoo.cfg || $(basename -- "$STATE_DIR") == .zk-test* ]]; then
        rm -rf -- "$STATE_DIR"
        log "deleted $STATE_DIR"
    else
        die "$STATE_DIR does not look like a zk-test.sh state folder; not deleting it"
    fi
}

cmd_status() {
    probe_all
    print_status_lines
    quorum_serves
}

cmd_leader() {
    probe_all
    leader_number || { log "no leader"; return 1; }
}

cmd_tls_hosts() {
    [[ -f $TLS_CA ]] || die "no TLS material in $TLS_DIR: start the ensemble with ZK_TEST_TLS=1 first"
    tls_hosts_string
}

cmd_start_brokers() {
    local b
    (($#)) || set -- "${BROKERS[@]}"
    check_broker_names "$@"
    take_lock
    brokers_launch "$@"
    brokers_wait "$@"
    for b in "$@"; do broker_url "$b"; done
}

cmd_stop_brokers() {
    (($#)) || set -- "${BROKERS[@]}"
    check_broker_names "$@"
    [[ -d $STATE_DIR ]] || return 0
    take_lock
    brokers_stop "$@"
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
        peer-links) peer_links ;;
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
        broker-status) broker_status_lines ;;
        broker-urls) broker_url rabbitmq && broker_url redis ;;
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
