#!/usr/bin/env bash
# What `make gpu-check` needs on the GPU machine (Python 3.12, torch + CUDA, transformers,
# accelerate, no network) that its image lacks, gathered here in one step:
#   .whl/                               py3.12 x86-64 wheels: tensorly (compactify.mpo imports it),
#                                       papermill and the Jupyter kernel stack (the notebook stage);
#                                       --no-deps, pinned to the versions of this study's venv
#   data/cache/gpu-carry/smollm2-meta/  SmolLM2-135M's config.json + tokenizer (3.5 MB), from which the
#                                       notebook stage builds a random-weight model of the same shape
# Both are gitignored; name both in the device tool's `carry`. Not carried (too big for 64 MiB a
# call, or not needed): lm-eval (9 MB + deps; evaluation notebooks are not in the default list),
# bitsandbytes (43 MB; scale.py records the 4-bit/mixed rows as errors), the model weights
# (517 MB fp32, 98 MB GGUF), data/cache/eval (37 MB).
# Usage:  bash scripts/gpu_wheels.sh        (needs pip to reach its index; ~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/python -m pip}"
PKGS="tensorly==0.10.0 papermill==2.7.0 entrypoints==0.4.2 tenacity==9.2.1 nbformat==5.11.1 nbclient==0.11.0
 fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
 jupyter_client==8.10.0 jupyter_core==5.9.1 traitlets==5.16.1 platformdirs==4.14.9 pyzmq==27.3.0 tornado==6.6.1
 ipykernel==7.4.0 comm==0.2.3 debugpy==1.8.22 matplotlib-inline==0.2.2 nest-asyncio2==1.7.4
 ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7 pexpect==4.9.0 ptyprocess==0.7.0
 prompt_toolkit==3.0.53 wcwidth==0.9.4 stack_data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4"
PLAT=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
  PLAT="$PLAT --platform $p"
done
mkdir -p .whl
# shellcheck disable=SC2086
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl $PKGS
META=data/cache/gpu-carry/smollm2-meta
SRC=data/cache/models/SmolLM2-135M-Instruct-fp32
if [ -f "$SRC/config.json" ]; then
  mkdir -p "$META"
  cp "$SRC"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} "$META"/
  [ -f "$SRC/chat_template.jinja" ] && cp "$SRC/chat_template.jinja" "$META"/
else
  echo "gpu_wheels: $SRC is missing (run 'make data' first); the notebook stage will be skipped" >&2
fi
du -sh .whl "$META" 2>/dev/null || true
echo "carry: [\".whl\", \"$META\"]"
