#!/usr/bin/env bash
# Install (or upgrade) Rill as a systemd service behind nginx on Debian 12/13.
# Run as root from a git checkout:  sudo deploy/install.sh --domain chat.example.com
# Running it again upgrades the code and restarts Rill; /etc/rill is never overwritten.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo deploy/install.sh --domain NAME [options]

Installs Rill as a systemd service behind nginx (Debian 12/13). Run it again to upgrade:
the code is replaced, the files in /etc/rill (config, key, access tokens) are kept.

  --domain NAME    the DNS name that points at this server (required)
  --email ADDR     get a Let's Encrypt certificate with certbot (HTTPS); without it
                   the certbot command to run later is printed
  --prefix DIR     where the code and its virtualenv go (default /opt/rill; not under
                   /home, /root, /tmp or /var/tmp, which the service cannot see)
  --workers N      run N Rill processes (1-32, default 1) on ports PORT..PORT+N-1 behind
                   nginx, sharing answers through Redis (systemd template rill@.service;
                   upgrades restart them one at a time, each letting its answers finish)
  --redis-url URL  the Redis of --workers 2 or more (default redis://127.0.0.1:6379/0,
                   Debian's redis-server, installed then; no password in it: it goes into
                   the unit file)
  --no-apt         do not apt-get install python3-venv, nginx, curl (and certbot, redis-server)
  --no-venv        do not create PREFIX/.venv or pip install the requirements
  --no-start       do not call systemctl, nginx, certbot or curl
  --root DIR       write every file under DIR instead of / (for tests and images;
                   needs --no-apt and --no-start, and then runs without root)
  -h, --help       show this help

Example:
  sudo deploy/install.sh --domain chat.example.com --email you@example.com
EOF
}

die_usage() {
    echo "install.sh: $1" >&2
    echo "Try 'deploy/install.sh --help'." >&2
    exit 2
}

die() {
    echo "install.sh: error: $1" >&2
    exit 1
}

step() { printf '==> %s\n' "$1"; }

# With several processes, how long a stopping one lets its answers in flight finish.
DRAIN_TIMEOUT=120

domain=""
email=""
prefix="/opt/rill"
root=""
do_apt=1
do_venv=1
do_start=1
workers=1
redis_url=""

while (($# > 0)); do
    case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    --domain | --email | --prefix | --root | --workers | --redis-url)
        (($# >= 2)) || die_usage "option $1 needs a value"
        case "$1" in
        --domain) domain="$2" ;;
        --email) email="$2" ;;
        --prefix) prefix="$2" ;;
        --root) root="$2" ;;
        --workers) workers="$2" ;;
        --redis-url) redis_url="$2" ;;
        esac
        shift 2
        ;;
    --domain=* | --email=* | --prefix=* | --root=* | --workers=* | --redis-url=*)
        value="${1#*=}"
        case "$1" in
        --domain=*) domain="$value" ;;
        --email=*) email="$value" ;;
        --prefix=*) prefix="$value" ;;
        --root=*) root="$value" ;;
        --workers=*) workers="$value" ;;
        --redis-url=*) redis_url="$value" ;;
        esac
        shift
        ;;
    --no-apt) do_apt=0 && shift ;;
    --no-venv) do_venv=0 && shift ;;
    --no-start) do_start=0 && shift ;;
    *) die_usage "unknown option: $1" ;;
    esac
done

[[ -n "$domain" ]] || die_usage "--domain is required (the DNS name that points at this server)"
[[ "$domain" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die_usage "--domain: not a host name: $domain"
if [[ -n "$email" && ! "$email" =~ ^[^[:space:]@]+@[^[:space:]@]+$ ]]; then
    die_usage "--email: not an email address: $email"
fi
[[ "$workers" =~ ^[1-9][0-9]?$ ]] && ((workers <= 32)) || die_usage "--workers: a number of processes from 1 to 32 (got: $workers)"
if [[ -n "$redis_url" ]]; then
    ((workers > 1)) || die_usage "--redis-url is for --workers 2 or more (one process needs no Redis)"
    # Written into the unit file (world-readable) and a sed expression: plain characters, no password.
    [[ "$redis_url" =~ ^redis://[A-Za-z0-9._:-]+(/[0-9]+)?$ ]] || die_usage "--redis-url: must be redis://host:port/db without a password (got: $redis_url)"
fi
local_redis=0
if ((workers > 1)) && [[ -z "$redis_url" ]]; then
    redis_url="redis://127.0.0.1:6379/0"
    local_redis=1
fi
# The prefix is written into the unit file and sed expressions: keep it to plain characters.
[[ "$prefix" =~ ^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$ ]] || die_usage "--prefix: must be an absolute path of letters, digits and . _ - / (got: $prefix)"
if [[ -n "$root" ]]; then
    ((do_apt == 0 && do_start == 0)) || die_usage "--root needs --no-apt and --no-start (apt, systemctl and nginx would act on this machine, not on $root)"
    mkdir -p -- "$root"
    root="$(cd -- "$root" && pwd)"
    [[ "$root" != "/" ]] || root=""
elif ((EUID != 0)); then
    echo "install.sh: run it as root: sudo deploy/install.sh --domain $domain ..." >&2
    echo "(or pass --root DIR --no-apt --no-start to install into a directory as yourself)" >&2
    exit 1
fi

# rill.service's sandbox hides some places from the service: ProtectHome=yes makes /home,
# /root and /run/user empty and inaccessible, PrivateTmp=yes gives it its own empty /tmp and
# /var/tmp. Code installed there could never start, so refuse it, symlinks resolved first.
# Under --root, symlinks resolve inside DIR, as they would on the machine it becomes.
real_root="${root:+$(realpath -- "$root")}"
real_prefix="$(realpath -m -- "$real_root$prefix")"
[[ -z "$real_root" || "$real_prefix" != "$real_root"/* ]] || real_prefix="${real_prefix#"$real_root"}"
shown="$prefix"
[[ "$real_prefix" == "$prefix" ]] || shown="$prefix (which resolves to $real_prefix)"
case "$real_prefix/" in
/home/* | /root/* | /run/user/*)
    die_usage "--prefix: $shown is hidden from the service by ProtectHome=yes in rill.service; use a directory such as /opt/rill or /srv/rill"
    ;;
/tmp/* | /var/tmp/*)
    die_usage "--prefix: $shown is hidden from the service by PrivateTmp=yes in rill.service (it gets its own empty /tmp and /var/tmp); use a directory such as /opt/rill or /srv/rill"
    ;;
esac
# The service runs as a dynamic user: every directory above the code must let others in.
parent="$real_prefix"
while parent="$(dirname -- "$parent")" && [[ "$parent" != / ]]; do
    if [[ -d "$real_root$parent" ]] && ! (($(stat -c '0%a' -- "$real_root$parent") & 1)); then
        die_usage "--prefix: the service could not reach $shown: $parent is mode $(stat -c '%a' -- "$real_root$parent") (others need x; chmod o+x $parent, or use another directory)"
    fi
done

src="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$src/server/__main__.py" && -f "$src/deploy/rill.service" ]] || die "run it from a Rill checkout ($src has no server/ or deploy/)"

etc="$root/etc/rill"
dest="$root$prefix"
unit_path="$root/etc/systemd/system/rill.service"
socket_path="$root/etc/systemd/system/rill.socket"
template_path="$root/etc/systemd/system/rill@.service"
site_path="$root/etc/nginx/sites-available/rill"
site_link="$root/etc/nginx/sites-enabled/rill"
owner=()
((EUID == 0)) && owner=(-o root -g root)
umask 022

# --- packages --------------------------------------------------------------------------
if ((do_apt)); then
    packages=(python3 python3-venv nginx curl ca-certificates)
    [[ -n "$email" ]] && packages+=(certbot python3-certbot-nginx)
    ((local_redis)) && packages+=(redis-server)
    step "Installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Rill needs Python 3.11 or newer (Debian 12 or 13)"

# --- the code --------------------------------------------------------------------------
items=(server web deploy requirements.txt config.toml)
if [[ "$(cd -- "$src" && pwd -P)" == "$(mkdir -p -- "$dest" && cd -- "$dest" && pwd -P)" ]]; then
    step "Code: already in $prefix (running the installed copy), not copied"
else
    step "Copying the code to $prefix"
    staging="$dest/.install-staging"
    rm -rf -- "$staging"
    mkdir -p -- "$staging"
    tar -C "$src" --exclude=__pycache__ --exclude=node_modules --exclude='*.pyc' -cf - "${items[@]}" |
        tar -C "$staging" --no-same-owner --no-same-permissions -xf -
    # Read-only for the service (DynamicUser): owned by root, writable by nobody else.
    chmod -R u+rwX,go+rX,go-w -- "$staging"
    ((EUID == 0)) && chown -R root:root -- "$staging"
    for item in "${items[@]}"; do
        rm -rf -- "${dest:?}/$item"
        mv -- "$staging/$item" "$dest/$item"
    done
    rmdir -- "$staging"
fi
chmod 755 -- "$dest"

if ((do_venv)); then
    venv="$dest/.venv"
    if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c '' 2>/dev/null; then
        step "The virtualenv's Python is gone (a Debian upgrade?): recreating it"
        rm -rf -- "$venv"
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        step "Creating $prefix/.venv"
        python3 -m venv -- "$venv"
    fi
    step "Installing the Python requirements"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$dest/requirements.txt"
    # The service cannot write here, so compile now rather than on every start.
    "$venv/bin/python" -m compileall -q "$dest/server" >/dev/null
fi

# --- /etc/rill: config and secrets, created once and never overwritten ------------------
step "Configuration in /etc/rill"
# 0755: the service runs as a dynamic user and reads config.toml itself (RILL_CONFIG);
# the two secrets are 0600 root and reach it only as systemd credentials.
install -d -m 0755 "${owner[@]}" -- "$etc"
if [[ ! -e "$etc/config.toml" ]]; then
    install -m 0644 "${owner[@]}" -- "$src/config.toml" "$etc/config.toml"
    echo "    created /etc/rill/config.toml (edit it, then restart Rill: the command is at the end)"
else
    chmod 0644 -- "$etc/config.toml"
    echo "    kept /etc/rill/config.toml"
fi

if [[ ! -e "$etc/deepseek.key" ]]; then
    install -m 0600 "${owner[@]}" /dev/null "$etc/deepseek.key"
    echo "    created /etc/rill/deepseek.key (empty: Rill runs its offline demo until you add a key)"
fi
chmod 0600 -- "$etc/deepseek.key"

new_token=""
if [[ ! -e "$etc/access-tokens" ]]; then
    new_token="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
    tmp="$(mktemp -- "$etc/.access-tokens.XXXXXX")"
    printf 'admin:%s\n' "$new_token" >"$tmp"
    chmod 0600 -- "$tmp"
    mv -- "$tmp" "$etc/access-tokens"
    echo "    created /etc/rill/access-tokens with one token, 'admin' (printed at the end)"
fi
chmod 0600 -- "$etc/access-tokens"

# The port Rill listens on, for nginx and the readiness check.
port="$(python3 - "$etc/config.toml" <<'EOF' 2>/dev/null || echo 8080
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    port = tomllib.load(f).get("server", {}).get("port", 8080)
print(int(port))
EOF
)"
[[ "$port" =~ ^[0-9]+$ ]] || port=8080

ports=()
for ((i = 0; i < workers; i++)); do
    ports+=($((port + i)))
done
# How to restart what this install runs (after editing the config or the key).
restart_hint="systemctl restart rill"
((workers == 1)) || restart_hint="sh -c 'for p in ${ports[*]}; do systemctl restart rill@\$p; done'"

# --- systemd ---------------------------------------------------------------------------
install -d -m 0755 -- "$(dirname -- "$unit_path")"
if ((workers == 1)); then
    step "systemd units /etc/systemd/system/rill.service and rill.socket (port $port, kept open across restarts)"
    sed "s#/opt/rill#$prefix#g" "$src/deploy/rill.service" >"$unit_path.tmp"
    sed "s#^ListenStream=127\.0\.0\.1:8080\$#ListenStream=127.0.0.1:$port#" "$src/deploy/rill.socket" >"$socket_path.tmp"
    grep -q "^ListenStream=127\.0\.0\.1:$port\$" "$socket_path.tmp" || die "could not write rill.socket"
    chmod 0644 -- "$unit_path.tmp" "$socket_path.tmp"
    mv -- "$unit_path.tmp" "$unit_path"
    mv -- "$socket_path.tmp" "$socket_path"
else
    # One process per port, made from rill.service: its port and Redis, one dynamic user
    # for all (User=: they share the state directory), and a stop that lets the answers in
    # flight finish while the others take the new ones (drain_timeout; TimeoutStopSec
    # above it plus twice shutdown_timeout).
    step "systemd template /etc/systemd/system/rill@.service (${#ports[@]} processes: ports ${ports[*]})"
    sed -e "s#/opt/rill#$prefix#g" \
        -e 's#^Description=Rill streaming chat relay$#Description=Rill streaming chat relay (port %i)#' \
        -e "s#^Environment=PYTHONUNBUFFERED=1\$#Environment=PYTHONUNBUFFERED=1\nEnvironment=RILL_PORT=%i\nEnvironment=RILL_REDIS_URL=$redis_url\nEnvironment=RILL_DRAIN_TIMEOUT=$DRAIN_TIMEOUT#" \
        -e 's#^DynamicUser=yes$#DynamicUser=yes\nUser=rill#' \
        -e '/rill\.socket/d' \
        -e "s#^TimeoutStopSec=.*#TimeoutStopSec=$((DRAIN_TIMEOUT + 60))#" \
        "$src/deploy/rill.service" >"$template_path.tmp"
    grep -q '^Environment=RILL_PORT=%i$' "$template_path.tmp" || die "could not make rill@.service from rill.service"
    chmod 0644 -- "$template_path.tmp"
    mv -- "$template_path.tmp" "$template_path"
fi

# --- nginx -----------------------------------------------------------------------------
step "nginx site /etc/nginx/sites-available/rill for $domain"
install -d -m 0755 -- "$(dirname -- "$site_path")" "$(dirname -- "$site_link")"
servers=""
for p in "${ports[@]}"; do
    servers+="    server 127.0.0.1:$p max_fails=0;\n"
done
sed -e "s/chat\.example\.com/$domain/g" -e "s/^    server 127\.0\.0\.1:8080 max_fails=0;$/${servers%\\n}/" \
    "$src/deploy/nginx/rill.conf" >"$site_path.tmp"
grep -q "^    server 127\.0\.0\.1:${ports[0]} max_fails=0;$" "$site_path.tmp" || die "could not write the nginx upstream block"
chmod 0644 -- "$site_path.tmp"
mv -- "$site_path.tmp" "$site_path"
ln -sfn ../sites-available/rill "$site_link"

certbot_cmd=(certbot --nginx -d "$domain" --redirect --keep-until-expiring -n)
if [[ -n "$email" ]]; then
    certbot_cmd+=(-m "$email" --agree-tos)
fi

status=0
if ((do_start)); then
    step "Starting Rill"
    systemctl daemon-reload
    if ((workers == 1)); then
        for unit in $(systemctl list-units --all --plain --no-legend 'rill@*.service' | awk '{print $1}'); do
            systemctl disable --now --quiet "$unit"  # from an earlier --workers install
        done
        systemctl enable --quiet rill.socket rill
        if ! systemctl is-active --quiet rill.socket ||
            ! systemctl show rill.socket -p Listen --value | grep -qF "127.0.0.1:$port "; then
            # An earlier install's Rill listened itself, or on another port: the socket
            # takes the port now (Rill stops first, as it may hold the port itself).
            systemctl stop rill
            systemctl restart rill.socket
        fi
        if systemctl is-active --quiet rill; then
            # The port stays open: new connections wait for the new process, not refused.
            echo "    restarting (answers in flight end with a retryable \"server restarting\" error)"
            systemctl restart rill
        else
            systemctl start rill
        fi
    else
        ((local_redis)) && systemctl enable --now --quiet redis-server
        if systemctl is-enabled --quiet rill 2>/dev/null || systemctl is-active --quiet rill; then
            systemctl disable --now --quiet rill  # from an earlier one-process install
        fi
        if systemctl is-enabled --quiet rill.socket 2>/dev/null || systemctl is-active --quiet rill.socket; then
            systemctl disable --now --quiet rill.socket  # it holds the first process's port
        fi
        for p in "${ports[@]}"; do
            systemctl enable --quiet "rill@$p"
            if systemctl is-active --quiet "rill@$p"; then
                # One at a time: the others take the new answers while this one lets its
                # answers finish (up to ${DRAIN_TIMEOUT} s) and restarts.
                echo "    restarting rill@$p"
                systemctl restart "rill@$p"
            else
                systemctl start "rill@$p"
            fi
            for _ in $(seq 30); do
                curl -fsS --max-time 2 "http://127.0.0.1:$p/readyz" >/dev/null 2>&1 && break
                sleep 1
            done
        done
    fi

    nginx -t
    # Rewriting the site drops what certbot added to it: put the certificate back.
    if [[ -n "$email" || -d /etc/letsencrypt/live/$domain ]]; then
        step "HTTPS certificate for $domain (certbot)"
        if ! "${certbot_cmd[@]}"; then
            systemctl reload-or-restart nginx
            echo "install.sh: certbot failed (is $domain's DNS pointing here, port 80 open?); retry with:" >&2
            echo "    sudo ${certbot_cmd[*]}" >&2
            status=1
        fi
    else
        systemctl reload-or-restart nginx
    fi

    for p in "${ports[@]}"; do
        step "Waiting for http://127.0.0.1:$p/readyz"
        ready=0
        for _ in $(seq 15); do
            if curl -fsS --max-time 2 "http://127.0.0.1:$p/readyz" >/dev/null 2>&1; then
                ready=1
                break
            fi
            sleep 1
        done
        unit="rill"
        ((workers == 1)) || unit="rill@$p"
        if ((ready)); then
            echo "    $unit is ready."
        else
            echo "install.sh: $unit did not answer /readyz within 15 s; see: journalctl -u $unit -n 50 --no-pager" >&2
            status=1
        fi
    done
fi

# --- what next -------------------------------------------------------------------------
echo
if ((do_start)); then
    if [[ -n "$email" || -d /etc/letsencrypt/live/$domain ]]; then
        echo "Rill: https://$domain/"
    else
        echo "Rill: http://$domain/   For HTTPS (needs DNS pointing here and port 80 open):"
        echo "    sudo apt-get install certbot python3-certbot-nginx"
        echo "    sudo certbot --nginx -d $domain -m you@example.com --agree-tos --redirect"
    fi
else
    echo "Installed into ${root:-/} without starting anything (--no-start)."
fi
echo "After editing /etc/rill/config.toml, restart Rill: sudo $restart_hint"
if [[ ! -s "$etc/deepseek.key" ]]; then
    echo
    echo "No DeepSeek key yet: Rill answers with its offline demo. To add the key:"
    echo "    read -rsp 'DeepSeek key: ' k; echo; sudo install -m 600 /dev/stdin /etc/rill/deepseek.key <<<\"\$k\"; unset k"
    echo "    sudo $restart_hint"
fi
if [[ -n "$new_token" ]]; then
    echo
    echo "Access token for 'admin' (sign in with it; it is shown only this once, kept in /etc/rill/access-tokens):"
    echo
    echo "    $new_token"
fi
exit "$status"
