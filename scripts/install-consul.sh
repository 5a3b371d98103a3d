#!/usr/bin/env bash
# install-consul.sh builds the Consul agent used by snakepit's tests and local
# clusters, and caches it at <repo>/.cache/bin/consul (git-ignored).
#
# Why it builds from source: there is no Debian package; `go install
# github.com/hashicorp/consul@...` is refused because that module has replace
# directives; releases from 1.15 on are under the BUSL or need modules that the
# Go module proxy does not serve. v1.14.11 is MPL-2.0 and builds from the proxy:
# download the module, copy it, drop the replace directives that point at its
# own api, sdk and proto-public folders (the published versions are used
# instead), and build with -mod=mod.
#
# Idempotent: when the cached binary already reports the wanted version the
# script only prints its path. Safe to run concurrently (flock).
#
# Environment:
#   CONSUL_VERSION        version to build (default 1.14.11)
#   SNAKEPIT_CONSUL_DEST  where to put the binary (default <repo>/.cache/bin/consul)
#
# Output: the last line on stdout is the absolute path of the binary.
set -euo pipefail

CONSUL_VERSION="${CONSUL_VERSION:-1.14.11}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${SNAKEPIT_CONSUL_DEST:-$REPO_ROOT/.cache/bin/consul}"
DEST_DIR="$(dirname "$DEST")"
mkdir -p "$DEST_DIR"
DEST="$(cd "$DEST_DIR" && pwd)/$(basename "$DEST")"

log() { printf 'install-consul: %s\n' "$*" >&2; }

have_wanted() {
	[[ -x "$DEST" ]] || return 1
	local got
	got="$("$DEST" version 2>/dev/null | head -n1 || true)"
	[[ "$got" == "Consul v${CONSUL_VERSION}" ]]
}

if have_wanted; then
	log "cached: $("$DEST" version | head -n1)"
	echo "$DEST"
	exit 0
fi

command -v go >/dev/null || { log "go is required on PATH"; exit 1; }

# Serialize concurrent installs (two test packages, or CI plus a developer).
LOCK="$DEST_DIR/.install-consul.lock"
if command -v flock >/dev/null; then
	exec 9>"$LOCK"
	flock 9
	if have_wanted; then
		log "cached (built by a concurrent run): $("$DEST" version | head -n1)"
		echo "$DEST"
		exit 0
	fi
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/snakepit-consul-build.XXXXXX")"
trap 'chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

log "downloading github.com/hashicorp/consul@v${CONSUL_VERSION} from the Go module proxy"
# Outside any module so the project's go.mod is neither read nor changed.
SRC_DIR="$(cd "$WORK" && GOWORK=off GOFLAGS= go mod download -json "github.com/hashicorp/consul@v${CONSUL_VERSION}" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -n "$SRC_DIR" && -d "$SRC_DIR" ]] || { log "go mod download gave no source directory"; exit 1; }

cp -R "$SRC_DIR" "$WORK/src"
chmod -R u+w "$WORK/src"
cd "$WORK/src"
for sub in api sdk proto-public; do
	GOWORK=off go mod edit -dropreplace="github.com/hashicorp/consul/$sub"
done

log "building (takes a few minutes on a small machine)"
start=$SECONDS
GOWORK=off GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 \
	go build -trimpath \
	-ldflags "-s -w -X github.com/hashicorp/consul/version.GitCommit=v${CONSUL_VERSION}" \
	-o "$WORK/consul" .
log "built in $((SECONDS - start))s"

got="$("$WORK/consul" version | head -n1)"
if [[ "$got" != "Consul v${CONSUL_VERSION}" ]]; then
	log "built binary reports '$got', want 'Consul v${CONSUL_VERSION}'"
	exit 1
fi
mv -f "$WORK/consul" "$DEST"
log "installed: $got"
echo "$DEST"
