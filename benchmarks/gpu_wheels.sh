#!/usr/bin/env bash
# Prepares the wheelhouse that benchmarks/gpu.py installs on a bare, offline GPU machine (Python 3.12 with its own
# torch, numpy, scipy, Pillow, OpenCV, scikit-image, transformers, huggingface_hub, tokenizers, safetensors and
# accelerate): the packages it lacks, at the versions of constraints.txt, as wheels for CPython 3.12 on x86-64 Linux.
#
#     benchmarks/gpu_wheels.sh [OUT]          # OUT defaults to benchmarks/wheelhouse (git-ignored)
#
# The wheelhouse travels with the checkout to the GPU machine (about 49 MiB: PyAV alone is 34 MiB), so it must stay
# under 64 MiB together with the tracked files; the script checks. PYTHON picks the pip to use (default: the
# project's .venv, else python3); GPU_PYTHON_VERSION the target Python (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/wheelhouse}
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
target_python=${GPU_PYTHON_VERSION:-3.12}

# What multitalk_model needs that the GPU image does not have (and what those need in turn).
packages=(
  diffusers importlib_metadata                      # the transformer, the VAE, the attention dispatcher
  ftfy wcwidth                                      # prompt cleaning (components.py)
  av soundfile cffi pycparser pyloudnorm            # media and audio (media.py, audio.py)
  pydantic pydantic_core annotated-types typing-inspection  # the job schema (jobs.py)
  typing_extensions                                 # newer than the image's, as pydantic needs (backward compatible)
  facenet-pytorch                                   # the MTCNN weights the evaluation row's metrics look for faces with
)
# Optional: the quantised rows. Not a project dependency yet: constraints.txt pins it once the platform uses it.
optional=(torchao==0.18.0)

pins=()
for name in "${packages[@]}"; do
  pattern="^${name//[-_]/[-_]}=="
  pin=$(grep -i -E "$pattern" constraints.txt || true)
  [[ -n $pin ]] || { echo "constraints.txt pins no version of $name" >&2; exit 1; }
  pins+=("$pin")
done
for spec in "${optional[@]}"; do
  pin=$(grep -i -E "^${spec%%==*}==" constraints.txt || true)
  pins+=("${pin:-$spec}")
done

rm -rf "$out"
mkdir -p "$out"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$target_python" "${platforms[@]}" --dest "$out" "${pins[@]}"

size=$(du -sm "$out" | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cm | tail -1 | cut -f1)
ls -1 "$out"
echo "wheelhouse: $out, ${size} MiB (+ ${tracked} MiB of tracked files travel with it; the limit is 64 MiB)"
if ((size + tracked >= 64)); then
  echo "too large to travel to the GPU machine" >&2
  exit 1
fi
