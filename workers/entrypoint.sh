#!/bin/sh
# worker-entrypoint: the worker image's ENTRYPOINT. It checks what a bench worker needs, then
# replaces itself with the command (the image's CMD, or docker-compose.yml's `command:`).
#
# For a `celery ... worker` command it refuses to start, with the reason and exit code 78
# (EX_CONFIG), when:
#   * WORKER_ID or QUEUE is empty: the worker is named $WORKER_ID@<hostname> and the healthcheck
#     asks that name whether it consumes $QUEUE;
#   * DISPATCH_WORKSPACE is set but is not a readable directory (a mount that went wrong);
#   * DISPATCH_CACHE_DIR is set but is not a directory this user can write: every shipped run
#     would fail (a volume mounted there that the image did not make, owned by root).
# An empty (or unset) workspace is fine: each run ships its test tree into the cache. It says so,
# and whether this worker takes unsigned runs (DISPATCH_SHIP_UNSIGNED) or trusts a signing key.
# Any other command (sh, python, celery inspect ...) runs unchecked, for debugging.
set -eu

fail() {
    echo "worker-entrypoint: $*" >&2
    exit 78
}

starts_a_worker() {
    # `celery ... worker ...` as separate words, or inside `sh -c "... celery ... worker ..."`.
    for arg in "$@"; do
        case " $arg " in
            *" worker "*) return 0 ;;
        esac
    done
    return 1
}

[ "$#" -gt 0 ] || fail "no command to run"

# The broker: CELERY_BROKER_URL, then BROKER_URL (the order of the docs and of worker-healthcheck).
# The celery command reads BROKER_URL as its --broker and lets it beat CELERY_BROKER_URL, and the
# image sets BROKER_URL to its default: without this, compose's CELERY_BROKER_URL (its
# ${BROKER_URL:-...}) would be ignored and the worker would use the image's default broker.
if [ -n "${CELERY_BROKER_URL:-}" ]; then
    export BROKER_URL="$CELERY_BROKER_URL"
fi

if starts_a_worker "$@"; then
    [ -n "${WORKER_ID:-}" ] || fail "WORKER_ID is empty: set it (e.g. -e WORKER_ID=worker-a)"
    [ -n "${QUEUE:-}" ] || fail "QUEUE is empty: set the queue this worker consumes (-e QUEUE=queue_a)"
    ws="${DISPATCH_WORKSPACE:-}"
    if [ -n "$ws" ]; then
        [ -d "$ws" ] || fail "DISPATCH_WORKSPACE=$ws is not a directory: unset it (runs ship their tree) or mount a checkout there (-v \"\$PWD\":$ws:ro)"
        if ! { [ -r "$ws" ] && [ -x "$ws" ]; }; then
            fail "uid $(id -u) cannot read $ws: make the checkout readable (chmod -R a+rX) or run as its owner (--user \"\$(id -u):\$(id -g)\")"
        fi
    fi
    cache="${DISPATCH_CACHE_DIR:-}"
    if [ -n "$cache" ]; then
        [ -d "$cache" ] || mkdir -p "$cache" 2>/dev/null \
            || fail "DISPATCH_CACHE_DIR=$cache is not a directory and uid $(id -u) cannot make it: mount a volume there (-v worker-a-cache:$cache)"
        if ! { [ -w "$cache" ] && [ -x "$cache" ]; }; then
            fail "uid $(id -u) cannot write its cache $cache: give it a volume it owns (a new named volume copies the image's $cache) or chown $(id -u) it"
        fi
    fi
    if [ -z "$ws" ] || [ -z "$(ls -A "$ws")" ]; then
        case "$(echo "${DISPATCH_SHIP_UNSIGNED:-}" | tr '[:upper:]' '[:lower:]')" in
            allow | 1 | yes | true | on) takes="signed and unsigned runs (DISPATCH_SHIP_UNSIGNED=allow)" ;;
            *) takes="runs signed by a key of DISPATCH_SHIP_TRUST${DISPATCH_SHIP_TRUST:+ ($DISPATCH_SHIP_TRUST)}" ;;
        esac
        echo "worker-entrypoint: no checkout in ${ws:-the workspace}: each run ships its test tree into ${cache:-the cache}; takes $takes" >&2
    fi
fi

exec "$@"
