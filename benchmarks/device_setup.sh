# Sourced at the start of a GPU run: installs the FlashInfer wheels found in .whl/ (if any) and puts leanattn (src/) on the path.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl && export PYTHONPATH="$HOME/site:$PYTHONPATH"
fi
export PYTHONPATH="$PWD/src:$PYTHONPATH" PYTHONUNBUFFERED=1
export OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
