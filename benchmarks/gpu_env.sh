# Source this at the start of every command on the lent GPU host (see ../shared/gpu/README.md):
#   . benchmarks/gpu_env.sh
# The host keeps /tmp while it stays warm, so the carried wheels (.whl) and the two halves of the
# bundled SmolLM2 GGUF (.model_a, .model_b) are installed / copied once, whichever call carries them.
# Exports PYTHONPATH (wheels + this repo) and MODEL (the joined GGUF, once both halves have come).
mkdir -p /tmp/sparse_llm_gpu
if [ -d .whl ] && [ ! -f /tmp/sparse_llm_gpu/site.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sparse_llm_gpu/site .whl/*.whl && touch /tmp/sparse_llm_gpu/site.done
  # The same without FlashInfer, for runs that must not pay its JIT compiles (auto then picks Triton).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sparse_llm_gpu/site_nofi $(ls .whl/*.whl | grep -v -e flashinfer -e tvm_ffi -e cuda_tile -e cudnn)
fi
[ -f .model_a/part ] && cp .model_a/part /tmp/sparse_llm_gpu/model_a.part
[ -f .model_b/part ] && cp .model_b/part /tmp/sparse_llm_gpu/model_b.part && cp .model_b/sha256 /tmp/sparse_llm_gpu/sha256
if [ ! -f /tmp/sparse_llm_gpu/smollm2.gguf ] && [ -f /tmp/sparse_llm_gpu/model_a.part ] && [ -f /tmp/sparse_llm_gpu/model_b.part ]; then
  cat /tmp/sparse_llm_gpu/model_a.part /tmp/sparse_llm_gpu/model_b.part > /tmp/sparse_llm_gpu/smollm2.gguf
  if [ "$(sha256sum /tmp/sparse_llm_gpu/smollm2.gguf | cut -d' ' -f1)" != "$(cat /tmp/sparse_llm_gpu/sha256)" ]; then
    echo "gpu_env.sh: joined model has the wrong sha256" >&2; rm -f /tmp/sparse_llm_gpu/smollm2.gguf
  fi
fi
[ -f /tmp/sparse_llm_gpu/smollm2.gguf ] && export MODEL=/tmp/sparse_llm_gpu/smollm2.gguf
export PYTHONPATH=/tmp/sparse_llm_gpu/site:$PWD FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1
