#!/usr/bin/env bash
# Prints the path of a working interpreter for Python X.Y (the one argument), or fails with a
# one-line reason. pyenv's versions come first (its shims on PATH answer for the selected version
# only), then pythonX.Y on PATH.
set -uo pipefail
want=${1:?usage: find-python.sh X.Y}
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/python"$want" \
                 "$(command -v "python$want" 2>/dev/null)"; do
  [ -n "$candidate" ] && [ -x "$candidate" ] || continue
  if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
    echo "$candidate"
    exit 0
  fi
done
echo "find-python: Python $want is not installed (looked in ${PYENV_ROOT:-$HOME/.pyenv}/versions and on PATH)" >&2
exit 1
