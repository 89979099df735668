#!/usr/bin/env bash
# A/B of git refs against the working tree in one device call (same machine, same process order).
#
#   bash benchmarks/probes/ab_trees.sh prepare main~3 exp/X          # here: export refs to ab/<name>
#   ROUNDS=2 bash benchmarks/probes/ab_trees.sh run <command...>      # on the GPU machine, ab/ copied along
#
# prepare: ``git archive`` of each ref into ab/<ref with / as _> (ab/ is git-ignored: copy it to
# the GPU machine with the tree). run: the command runs in the repo root ("main") and then in every
# ab/* tree, ROUNDS times (default 2, alternating so clock or thermal drift shows up in both),
# with PYTHONPATH set to that tree and TREE_OUT=$OUT/<tree>/<round> for its files; its output is
# prefixed with the tree's name. Quote commands that use TREE_OUT, e.g.
#   bash benchmarks/probes/ab_trees.sh run bash -c 'python3 -m benchmarks.run --set prefill --modes bwd \
#     --filter D=128 --providers tileattn --out $TREE_OUT/bwd.json'
# then: python3 benchmarks/probes/ab_summary.py $OUT  (one line per case, ratios to main)
set -uo pipefail
mode=${1:?usage: ab_trees.sh prepare REF... | run COMMAND...}
shift
if [ "$mode" = prepare ]; then
  for ref in "$@"; do
    dir=ab/${ref//\//_}
    rm -rf "$dir" && mkdir -p "$dir" && git archive "$ref" | tar -x -C "$dir" && echo "exported $ref -> $dir"
  done
  exit 0
fi
[ "$mode" = run ] || { echo "unknown mode $mode" >&2; exit 2; }
OUT=${OUT:-gpu_out}
root=$PWD
trees=(".")
for d in ab/*/; do [ -d "$d" ] && trees+=("${d%/}"); done
for round in $(seq 1 "${ROUNDS:-2}"); do
  for tree in "${trees[@]}"; do
    name=$([ "$tree" = . ] && echo main || basename "$tree")
    export TREE_OUT="$OUT/$name/$round"
    mkdir -p "$TREE_OUT"
    (cd "$root/$tree" && PYTHONPATH=. PYTHONUNBUFFERED=1 "$@" 2>&1 | sed "s/^/[$name $round] /")
  done
done
