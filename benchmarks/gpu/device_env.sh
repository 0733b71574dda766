# Source at the start of every command on a lent GPU machine (repository root, .whl carried):
#   source benchmarks/gpu/device_env.sh
# Installs the carried wheels into /tmp/site (once per machine) and puts them and the repository on
# PYTHONPATH; the image's own python3 provides PyTorch.
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/deepspeed-*.tar.gz || return 1
  touch /tmp/site/.done
fi
export PYTHONPATH="/tmp/site:$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export DLIGHTNING_BENCH_RESULTS="${OUT:-/tmp}/RESULTS_gpu.md"
python3 -c "import torch, lightning, peft, lpips, diffusers, webdataset, deepspeed, dlightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || return 1
