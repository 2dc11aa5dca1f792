#!/bin/sh
# worker-entrypoint: the worker image's ENTRYPOINT. It checks what a bench worker needs, then
# replaces itself with the command (the image's CMD, or docker-compose.yml's `command:`).
#
# For a `celery ... worker` command it refuses to start, with the reason and exit code 78
# (EX_CONFIG), when:
#   * WORKER_ID or QUEUE is empty: the worker is named $WORKER_ID@<hostname> and the healthcheck
#     asks that name whether it consumes $QUEUE;
#   * DISPATCH_WORKSPACE is not a readable directory, or is empty: the checkout is not mounted
#     there, and every dispatched test would come back "not found".
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
    [ -n "$ws" ] || fail "DISPATCH_WORKSPACE is empty: set it to where the checkout is mounted"
    [ -d "$ws" ] || fail "DISPATCH_WORKSPACE=$ws is not a directory: mount the checkout there (-v \"\$PWD\":$ws:ro)"
    if ! { [ -r "$ws" ] && [ -x "$ws" ]; }; then
        fail "uid $(id -u) cannot read $ws: make the checkout readable (chmod -R a+rX) or run as its owner (--user \"\$(id -u):\$(id -g)\")"
    fi
    if [ -z "$(ls -A "$ws")" ]; then
        fail "$ws is empty: the checkout is not mounted (docker run -v \"\$PWD\":$ws:ro ..., compose mounts ./ there)"
    fi
fi

exec "$@"
