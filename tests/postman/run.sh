#!/usr/bin/env bash
# Run the Postman collection with newman against the real service (`python -m app`, what
# `make run` starts) and a local server of docs/postman/images; fails if any test fails.
# newman is installed pinned into .ci/node (git-ignored) when missing. Everything this
# script starts is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

NEWMAN_VERSION=6.2.2
NEWMAN=.ci/node/node_modules/.bin/newman
PY=${PY:-.venv/bin/python}
COLLECTION=docs/postman/batch-image-service.postman_collection.json
SAMPLE_IMAGE_HOST=127.0.0.1:8765  # what docs/postman/products.csv names

if [ ! -x "$NEWMAN" ] || [ "$("$NEWMAN" --version)" != "$NEWMAN_VERSION" ]; then
    npm install --no-audit --no-fund --loglevel=error --prefix .ci/node "newman@$NEWMAN_VERSION"
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
image_port=$(free_port)
api_port=$(free_port)

"$PY" -m http.server "$image_port" --bind 127.0.0.1 --directory docs/postman/images \
    >"$work/images.log" 2>&1 &
pids+=($!)

# The sample CSVs, with the image server's real address, where newman finds the files.
sed "s/$SAMPLE_IMAGE_HOST/127.0.0.1:$image_port/g" docs/postman/products.csv >"$work/products.csv"
cp docs/postman/bad-products.csv "$work/bad-products.csv"

env HOST=127.0.0.1 PORT="$api_port" PUBLIC_BASE_URL= \
    DATABASE_URL="sqlite:///$work/images.db" MEDIA_ROOT="$work/media" \
    ALLOW_PRIVATE_HOSTS="127.0.0.1:$image_port" WEBHOOK_ALLOW_PRIVATE_HOSTS="127.0.0.1:$image_port" \
    TASK_BACKEND=inprocess STORAGE_BACKEND=local API_KEYS= \
    "$PY" -m app >"$work/service.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
    if "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done

status=0
"$NEWMAN" run "$COLLECTION" --working-dir "$work" --color off \
    --env-var "baseUrl=http://127.0.0.1:$api_port" \
    --env-var "imageBaseUrl=http://127.0.0.1:$image_port" || status=$?
if [ "$status" -ne 0 ]; then
    echo "== service log" >&2
    tail -n 50 "$work/service.log" >&2
fi
exit "$status"
