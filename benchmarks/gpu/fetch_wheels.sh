#!/usr/bin/env bash
# Download, on a machine with registry access, the wheels a lent GPU machine lacks (its image has
# PyTorch, transformers, opencv, scipy, pytest... but not diffusers, lpips, webdataset, omegaconf,
# deepspeed, pydantic). They land in .whl/ at the repository root, ignored by git, and travel with
# the device tool's `carry: [".whl"]` (about 13 MB; PyAV and wandb stay behind: nothing on the GPU
# path imports them at module level, and the runs log to CSV).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
PIP="${PIP:-.venv/bin/pip}"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# The versions this project is tested with (see the venv's pip list).
WHEELS=(diffusers==0.42.1 lpips==0.1.4 webdataset==1.0.2 omegaconf==2.4.0 braceexpand==0.1.7 hjson==3.1.0
        pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        lightning==2.6.6 peft==0.21.2)
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${WHEELS[@]}"
# DeepSpeed ships no wheel: its source archive installs without compiling (ops build on first use).
"$PIP" download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
ls -la .whl && du -sh .whl
