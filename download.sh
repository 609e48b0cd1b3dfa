#!/usr/bin/env bash
# Fetch the data SeqMatchNet needs into the layout main.py expects:
#   TARGET/structFiles/                      struct files (.db) and split indices (.npz)
#   TARGET/structFiles/seqBoundsFiles/       MSLS sequence bounds (.txt)
#   TARGET/data/descData/netvlad-pytorch/    precomputed NetVLAD descriptors (.npy)
# Run `bash download.sh --help` for the options.
set -euo pipefail

# ---------------------------------------------------------------- settings --
SEQNET_BASE_URL="${SEQNET_BASE_URL:-https://raw.githubusercontent.com/oravus/seqNet/main/structFiles}"
SEQMATCHNET_BASE_URL="${SEQMATCHNET_BASE_URL:-https://raw.githubusercontent.com/oravus/SeqMatchNet/main/structFiles}"
DESC_BASE_URL="${DESC_BASE_URL:-}"      # optional mirror of the descriptor files
CHECKSUMS_FILE="${CHECKSUMS_FILE:-}"    # optional local manifest (sha256sum format)

DESC_BOX_URL="https://universityofadelaide.box.com/s/p8uh5yncsaxk7g8lwr8pihnwkqbc2pkf"
IMAGES_BOX_URL="https://universityofadelaide.box.com/s/zkfk1akpbo5318fzqmtvlpp7030ex4up"
MODELS_BOX_URL="https://universityofadelaide.box.com/s/mp45yapl0j0by6aijf5kj8obt8ky0swk"
NETVLAD_PCA_URL="https://huggingface.co/TobiasRobotics/Patch-NetVLAD/resolve/main/pitts_WPCA4096.pth.tar"

OX_PAIR="2015-03-17-11-08-44_2014-12-16-18-44-24"
# Nordland and oxford-v1.0: in both repositories (SeqMatchNet is the fallback mirror).
STRUCTS_MIRRORED=(
  nordland_train_d-40_d2-10.db
  nordland_val_d-1_d2-1.db
  nordland_test_d-1_d2-1.db
  "oxford-v1.0_${OX_PAIR}_train_d-20_d2-5.db"
  "oxford-v1.0_${OX_PAIR}_test_d-10_d2-5.db"
  oxford-v1.0_splitInds.npz
)
# oxford-pnv: SeqNet repository only.
STRUCTS_SEQNET_ONLY=(
  "oxford-pnv_${OX_PAIR}_train_d-20_d2-5.db"
  "oxford-pnv_${OX_PAIR}_test_d-25_d2-5.db"
  oxford-pnv_splitInds.npz
)
# MSLS cities whose struct and sequence-bounds files are fetched with --what msls
# (override with MSLS_CITIES="amman austin ...").
read -r -a MSLS_CITIES <<< "${MSLS_CITIES:-amman austin melbourne}"
DESC_FILES=(
  nordland-clean-summer.npy
  nordland-clean-winter.npy
  nordland-clean-spring.npy
  nordland-clean-fall.npy
  oxford_2015-03-17-11-08-44_stereo_left.npy
  oxford_2014-12-16-18-44-24_stereo_left.npy
)

usage() {
  cat <<EOF
Usage: bash download.sh [--what WHAT] [TARGET_DIR]

Downloads the SeqMatchNet data into TARGET_DIR (default: ./, i.e. the folder
you run main.py from):
  TARGET_DIR/structFiles/                     struct files and split indices
  TARGET_DIR/structFiles/seqBoundsFiles/      MSLS sequence bounds
  TARGET_DIR/data/descData/netvlad-pytorch/   NetVLAD descriptors

  --what WHAT   comma-separated list of: structs, msls, descriptors, all
                (default: structs,descriptors)
                  structs      Nordland, oxford-v1.0 and oxford-pnv struct files
                  msls         MSLS struct and seqBounds files (${MSLS_CITIES[*]})
                  descriptors  descriptors from \$DESC_BASE_URL if set, otherwise
                               print the manual download steps
  -h, --help    show this help

Files already present and valid are skipped; each download goes to a temporary
file that is verified (file type, and sha256 when a manifest is known) before it
is moved into place. The exit status is non-zero if any file failed.

Environment:
  SEQNET_BASE_URL       struct files source (default: $SEQNET_BASE_URL)
  SEQMATCHNET_BASE_URL  fallback for Nordland/oxford-v1.0 (default: $SEQMATCHNET_BASE_URL)
  DESC_BASE_URL         mirror serving the descriptor .npy files (default: unset)
  CHECKSUMS_FILE        local sha256sum manifest ("HASH  name") to verify against;
                        a SHA256SUMS file at a base URL is also used when present
  MSLS_CITIES           space-separated MSLS cities (default: amman austin melbourne)
EOF
}

# --------------------------------------------------------------- arguments --
WHAT="structs,descriptors"
TARGET="./"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --what) [[ $# -ge 2 ]] || { echo "error: --what needs a value" >&2; exit 2; }
            WHAT="$2"; shift 2 ;;
    --what=*) WHAT="${1#--what=}"; shift ;;
    -*) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) TARGET="$1"; shift ;;
  esac
done

DO_STRUCTS=0; DO_MSLS=0; DO_DESC=0
IFS=',' read -r -a what_items <<< "$WHAT"
for item in "${what_items[@]}"; do
  case "$item" in
    structs) DO_STRUCTS=1 ;;
    msls) DO_MSLS=1 ;;
    descriptors) DO_DESC=1 ;;
    all) DO_STRUCTS=1; DO_MSLS=1; DO_DESC=1 ;;
    *) echo "error: unknown --what item '$item' (structs, msls, descriptors, all)" >&2; exit 2 ;;
  esac
done

if command -v curl >/dev/null 2>&1; then
  FETCHER=curl
elif command -v wget >/dev/null 2>&1; then
  FETCHER=wget
else
  echo "error: neither curl nor wget is installed" >&2; exit 1
fi
if command -v sha256sum >/dev/null 2>&1; then
  sha256() { sha256sum "$1" | cut -d' ' -f1; }
else
  sha256() { shasum -a 256 "$1" | cut -d' ' -f1; }
fi
if [[ -n "$CHECKSUMS_FILE" && ! -r "$CHECKSUMS_FILE" ]]; then
  echo "error: CHECKSUMS_FILE '$CHECKSUMS_FILE' is not readable" >&2; exit 2
fi

mkdir -p "$TARGET"
TARGET="$(cd "$TARGET" && pwd)"
STRUCT_DIR="$TARGET/structFiles"
DESC_DIR="$TARGET/data/descData/netvlad-pytorch"

# ---------------------------------------------------------- temp + cleanup --
WORK_DIR="$(mktemp -d)"   # fetched SHA256SUMS manifests
CURRENT_TMP=""            # partial download in progress, removed on any exit
cleanup() {
  [[ -n "$CURRENT_TMP" ]] && rm -f -- "$CURRENT_TMP"
  rm -rf -- "$WORK_DIR"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; [[ -n "$FETCH_PID" ]] && kill "$FETCH_PID" 2>/dev/null; wait 2>/dev/null; exit 130' INT TERM

N_DOWNLOADED=0; N_PRESENT=0; N_FAILED=0; N_MANUAL=0
FAILED_NAMES=()

# ---------------------------------------------------------------- helpers --
# fetch URL OUTFILE: download quietly, fail on HTTP errors, retry transient errors.
# The transfer runs in the background and the script waits for it, so that Ctrl-C or a SIGTERM to
# this script is handled at once (the trap stops the transfer and removes the partial file).
FETCH_PID=""
fetch() {
  local rc=0
  if [[ "$FETCHER" == curl ]]; then
    curl -fsSL --retry 3 --retry-delay 2 --connect-timeout 20 \
      --speed-limit 1024 --speed-time 60 -o "$2" "$1" &
  else
    wget -q --tries=3 --timeout=60 -O "$2" "$1" &
  fi
  FETCH_PID=$!
  wait "$FETCH_PID" || rc=$?
  FETCH_PID=""
  return "$rc"
}

# reachable BASE_URL: does the host of BASE_URL answer at all (any HTTP status)? Asked once per
# base, quickly, so that a machine without network says so at once instead of retrying every file.
declare -A REACHABLE=()
OFFLINE_NOTE=0
reachable() {
  local base="$1" ok=1 why host
  host="$(echo "$base" | cut -d/ -f1-3)"
  if [[ -z "${REACHABLE[$host]+x}" ]]; then
    local rc=0
    if [[ "$FETCHER" == curl ]]; then    # unreachable: cannot resolve (5, 6), connect (7) or connect in time
      curl -sS -o /dev/null --connect-timeout 5 --max-time 8 -r 0-0 "$host/" 2> "$WORK_DIR/probe.err" || rc=$?
      if ! [[ $rc -eq 5 || $rc -eq 6 || $rc -eq 7 ]] &&
         ! { [[ $rc -eq 28 ]] && grep -qiE "connect|resolv" "$WORK_DIR/probe.err"; }; then
        ok=0
      fi
    else                                 # wget: 4 is a network failure; 8 (an HTTP error) means it answered
      wget -q --spider --timeout=5 --tries=1 "$host/" 2> "$WORK_DIR/probe.err" || rc=$?
      [[ $rc -ne 4 ]] && ok=0
    fi
    REACHABLE[$host]=$ok
    if [[ $ok -ne 0 ]]; then
      why="$(tail -n 1 "$WORK_DIR/probe.err" | sed 's/^curl: ([0-9]*) //')"
      echo "  no network: cannot reach $host (${why:-no answer})"
      OFFLINE_NOTE=1
    fi
  fi
  return "${REACHABLE[$host]}"
}

# first_bytes_hex FILE N: the first N bytes of FILE as lowercase hex.
first_bytes_hex() { LC_ALL=C od -An -tx1 -N "$2" -- "$1" | tr -d ' \n'; }
ascii_hex() { printf '%s' "$1" | LC_ALL=C od -An -tx1 | tr -d ' \n'; }
MAGIC_MAT="$(ascii_hex 'MATLAB 5.0 MAT-file')"
MAGIC_ZIP="$(ascii_hex 'PK')"
MAGIC_NPY="93$(ascii_hex 'NUMPY')"

# check_type FILE NAME: file-type check by extension; prints the reason on failure.
check_type() {
  local file="$1" name="$2" want="" label=""
  [[ -s "$file" ]] || { echo "empty file"; return 1; }
  case "$name" in
    *.db)  want="$MAGIC_MAT"; label="MATLAB 5.0 MAT-file" ;;
    *.npz) want="$MAGIC_ZIP"; label="zip (.npz)" ;;
    *.npy) want="$MAGIC_NPY"; label=".npy" ;;
    *) return 0 ;;
  esac
  if [[ "$(first_bytes_hex "$file" $(( ${#want} / 2 )))" != "$want" ]]; then
    echo "not a $label file"; return 1
  fi
}

# manifest_for BASE_URL: path of the local copy of BASE_URL/SHA256SUMS (empty file
# if there is none); fetched once per base URL.
manifest_for() {
  local key
  key="$(printf '%s' "$1" | cksum | cut -d' ' -f1)"
  local path="$WORK_DIR/SHA256SUMS.$key"
  if [[ ! -e "$path" ]]; then
    fetch "$1/SHA256SUMS" "$path" 2>/dev/null || : > "$path"
  fi
  echo "$path"
}

# expected_hash MANIFEST RELNAME: hash listed for RELNAME (or its basename).
expected_hash() {
  [[ -s "$1" ]] || return 0
  awk -v rel="$2" -v base="${2##*/}" '
    { name = $2; sub(/^\*/, "", name); sub(/^\.\//, "", name)
      if (name == rel || name == base) { print tolower($1); exit } }' "$1"
}

# check_hash FILE RELNAME MANIFEST...: every manifest that lists RELNAME must agree.
check_hash() {
  local file="$1" rel="$2" manifest want have=""
  shift 2
  for manifest in "$@"; do
    want="$(expected_hash "$manifest" "$rel")"
    [[ -n "$want" ]] || continue
    [[ -n "$have" ]] || have="$(sha256 "$file")"
    if [[ "$have" != "$want" ]]; then
      echo "sha256 mismatch (expected $want, got $have)"; return 1
    fi
  done
}

# get RELNAME DEST_DIR BASE_URL [FALLBACK_BASE_URL...]
# Downloads BASE_URL/RELNAME to DEST_DIR/<basename>, trying each base in turn.
get() {
  local rel="$1" dest_dir="$2"
  shift 2
  local name="${rel##*/}" base url reason manifests=()
  local dest="$dest_dir/$name"
  [[ -n "$CHECKSUMS_FILE" ]] && manifests+=("$CHECKSUMS_FILE")

  if [[ -e "$dest" ]]; then
    # Present: valid type, and matches a manifest of the first source if it has one.
    if reason="$(check_type "$dest" "$name")" &&
       reason="$(check_hash "$dest" "$rel" "${manifests[@]}" "$(manifest_for "$1")")"; then
      printf '  exists      %s\n' "$dest"
      N_PRESENT=$((N_PRESENT + 1)); return 0
    fi
    echo "  WARNING: $dest is present but invalid ($reason); downloading it again"
  fi

  mkdir -p "$dest_dir"
  local bases=()
  for base in "$@"; do reachable "$base" && bases+=("$base"); done
  if [[ ${#bases[@]} -eq 0 ]]; then            # no source answers: counted, said once above
    N_FAILED=$((N_FAILED + 1)); FAILED_NAMES+=("$name")
    return 0
  fi
  set -- "${bases[@]}"
  while [[ $# -gt 0 ]]; do
    base="$1"; shift
    url="$base/$rel"
    CURRENT_TMP="$(mktemp "$dest_dir/.${name}.part.XXXXXX")"
    if ! fetch "$url" "$CURRENT_TMP" 2> "$WORK_DIR/fetch.err"; then
      reason="download failed ($(tail -n 1 "$WORK_DIR/fetch.err" | sed 's/^curl: ([0-9]*) //'))"
      [[ "$reason" != "download failed ()" ]] || reason="download failed"
    elif ! reason="$(check_type "$CURRENT_TMP" "$name")"; then
      :
    elif ! reason="$(check_hash "$CURRENT_TMP" "$rel" "${manifests[@]}" "$(manifest_for "$base")")"; then
      :
    else
      mv -f -- "$CURRENT_TMP" "$dest"
      CURRENT_TMP=""
      printf '  downloaded  %s\n' "$dest"
      N_DOWNLOADED=$((N_DOWNLOADED + 1)); return 0
    fi
    rm -f -- "$CURRENT_TMP"; CURRENT_TMP=""
    if [[ $# -gt 0 ]]; then
      echo "  WARNING: $name: $reason from $url; trying $1/$rel"
    else
      echo "  ERROR: $name: $reason from $url"
    fi
  done
  N_FAILED=$((N_FAILED + 1)); FAILED_NAMES+=("$name")
  return 0
}

print_manual_descriptors() {
  cat <<EOF
  The descriptors are on a University of Adelaide Box folder share, which needs
  a browser (no direct link; set DESC_BASE_URL to use a mirror instead):
    $DESC_BOX_URL
    (about 3.4 GB for Nordland-clean, 0.3 GB for Oxford RobotCar)
  Download these files and put them EXACTLY here:
EOF
  local name dest
  for name in "${DESC_FILES[@]}"; do
    dest="$DESC_DIR/$name"
    if [[ -e "$dest" ]] && check_type "$dest" "$name" >/dev/null; then
      printf '    [present] %s\n' "$dest"
      N_PRESENT=$((N_PRESENT + 1))
    else
      printf '    [missing] %s\n' "$dest"
      N_MANUAL=$((N_MANUAL + 1))
    fi
  done
}

print_other_links() {
  cat <<EOF
  Other resources (manual, browser downloads):
    Nordland-clean images:        $IMAGES_BOX_URL
    SeqNet trained models:        $MODELS_BOX_URL
    NetVLAD+PCA (4096-D) model that produced the descriptors (Pittsburgh, Patch-NetVLAD):
                                  $NETVLAD_PCA_URL
  Note: the old cloudstor.aarnet.edu.au links of the original README/download.sh
  are dead (the service closed in December 2023).
EOF
}

# ------------------------------------------------------------------- main --
echo "Target: $TARGET (fetching with $FETCHER)"

if [[ $DO_STRUCTS -eq 1 ]]; then
  echo "Struct files and split indices -> $STRUCT_DIR"
  for f in "${STRUCTS_MIRRORED[@]}"; do
    get "$f" "$STRUCT_DIR" "$SEQNET_BASE_URL" "$SEQMATCHNET_BASE_URL"
  done
  for f in "${STRUCTS_SEQNET_ONLY[@]}"; do
    get "$f" "$STRUCT_DIR" "$SEQNET_BASE_URL"
  done
fi

if [[ $DO_MSLS -eq 1 ]]; then
  echo "MSLS struct and sequence-bounds files (${MSLS_CITIES[*]}) -> $STRUCT_DIR"
  for city in "${MSLS_CITIES[@]}"; do
    get "msls_${city}_d-20_d2-5.db" "$STRUCT_DIR" "$SEQNET_BASE_URL"
    for part in database query; do
      get "seqBoundsFiles/msls_${city}_${part}_seqBounds.txt" "$STRUCT_DIR/seqBoundsFiles" "$SEQNET_BASE_URL"
    done
  done
  echo "  MSLS descriptors are not published: extract them yourself into"
  echo "    $DESC_DIR/msls_<city>_{database,query}.npy"
fi

if [[ $DO_DESC -eq 1 ]]; then
  echo "NetVLAD descriptors -> $DESC_DIR"
  if [[ -n "$DESC_BASE_URL" ]]; then
    for f in "${DESC_FILES[@]}"; do
      get "$f" "$DESC_DIR" "$DESC_BASE_URL"
    done
  else
    print_manual_descriptors
  fi
  print_other_links
fi

echo
summary="Summary: $N_DOWNLOADED downloaded, $N_PRESENT present, $N_FAILED failed"
[[ $N_MANUAL -gt 0 ]] && summary+=", $N_MANUAL to fetch manually (see above)"
echo "$summary"
if [[ $N_FAILED -gt 0 ]]; then
  echo "Failed: ${FAILED_NAMES[*]}"
  if [[ $OFFLINE_NOTE -eq 1 ]]; then
    echo "No network to a source above: run this again where the network reaches it, point SEQNET_BASE_URL /"
    echo "SEQMATCHNET_BASE_URL (and DESC_BASE_URL) at a mirror you can reach, or copy the files by hand into"
    echo "$STRUCT_DIR from https://github.com/oravus/seqNet/tree/main/structFiles (the README lists every link)."
  fi
  exit 1
fi
echo "Next step (run from $TARGET, the data paths are relative to it), e.g.:"
echo "  python main.py --mode test --seqL 5 --dataset nordland-sw --split test"
