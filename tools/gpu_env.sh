# Sourced by the device scripts: install the project and the wheels that the lent machine lacks
# (.whl/: diffusers, pyzmq, importlib_metadata, nilearn, nibabel, codecarbon, pycountry, rapidfuzz;
# pytest, pluggy, iniconfig, packaging, pygments for gpu_tests.sh),
# and log to $OUT/$LOG. Commands run from the repository root (no folder there is named like the package).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$LOG") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CODECARBON_LOG_LEVEL=error
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
