# Shared helpers for Drover's scripts (sourced, not run).

log() { echo "==> $*" >&2; }

# Every failure names the command and line that failed, so a CI log says what broke.
trap 'rc=$?; echo "${BASH_SOURCE[0]}: line $LINENO: \"$BASH_COMMAND\" failed with exit code $rc" >&2' ERR

# Cargo may be installed by rustup without being on a non-login shell's PATH.
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
export PATH="$HOME/.cargo/bin:$PATH"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt-get install PACKAGES, updating the package lists once if needed.
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq </dev/null >/dev/null
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
}

# The Docker engine must answer; start it if this machine has it installed but not running.
ensure_docker() {
  if docker info >/dev/null 2>&1; then return 0; fi
  log "the Docker engine is not answering; starting dockerd"
  (as_root setsid nohup dockerd >/tmp/drover-dockerd.log 2>&1 </dev/null &)
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "error: no Docker engine (docker info fails); dockerd log:" >&2
  tail -n 20 /tmp/drover-dockerd.log >&2 || true
  return 1
}

# moto's S3-compatible server (PyPI `moto[server]`) for the S3 storage tests (tests/tests/storage.rs).
# Idempotent and non-interactive: uses a moto_server already on PATH, else installs one into a venv
# under ~/.cache/drover (python3 -m venv; Debian's python3-venv is installed first if venv is missing)
# and exports DROVER_MOTO_SERVER, which the tests run.
ensure_moto() {
  local venv="${DROVER_MOTO_VENV:-$HOME/.cache/drover/moto-venv}"
  if [ -x "$venv/bin/moto_server" ]; then
    export DROVER_MOTO_SERVER="$venv/bin/moto_server"
    return 0
  fi
  if [ -z "${DROVER_MOTO_VENV:-}" ] && command -v moto_server >/dev/null 2>&1 \
    && moto_server --help >/dev/null 2>&1; then
    export DROVER_MOTO_SERVER
    DROVER_MOTO_SERVER=$(command -v moto_server)
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  log "installing moto[server] (PyPI) into $venv"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" </dev/null
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6' </dev/null
  "$venv/bin/moto_server" --help >/dev/null
  export DROVER_MOTO_SERVER="$venv/bin/moto_server"
}
