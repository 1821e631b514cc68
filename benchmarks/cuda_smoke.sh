#!/bin/bash
# The SmolLM2 recipes for 4 steps each on one CUDA GPU, with the CUDA peak memory and time of each run.
#
#   bash benchmarks/cuda_smoke.sh MODEL_DIR PREFERENCES_DIR PROMPTS_DIR
#
# MODEL_DIR: the folder of `hf-reinforce make-smollm2`, or any model of that shape (a random-weight one tests the
# code paths and memory, not learning); the datasets are those of `hf-reinforce real-demo --data_only`. Runs the
# reward recipe without and with `shared_prefix_forward`, the REINFORCE recipe as shipped (fp32), and the REINFORCE
# recipe in bf16 (`--bf16 true --dtype bfloat16`) with torch.multinomial sampling.
set -euo pipefail
model=$1 preferences=$2 prompts=$3
work=$(mktemp -d)
peak() {  # MODULE ARGS...: run a training script, then print its CUDA peak and wall time
  python - "$@" <<'PY'
import runpy, sys, time, torch
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
start = time.perf_counter()
runpy.run_module(module, run_name="__main__")
print(f"PEAK {module} {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, {time.perf_counter() - start:.1f} s")
PY
}
common=(--model_name_or_path "$model" --use_cpu false --max_steps 4 --logging_steps 1 --disable_tqdm true)
for shared in false true; do
  peak hf_reinforce.scripts.reward --config recipes/smollm2-135m/reward/config_qlora.yaml "${common[@]}" \
    --dataset_name "$preferences" --output_dir "$work/reward_$shared" --shared_prefix_forward $shared
done
peak hf_reinforce.scripts.reinforce --config recipes/smollm2-135m/reinforce/config_qlora.yaml "${common[@]}" \
  --dataset_name "$prompts" --reward_model_name_or_path "$work/reward_true" --output_dir "$work/reinforce_fp32"
peak hf_reinforce.scripts.reinforce --config recipes/smollm2-135m/reinforce/config_qlora.yaml "${common[@]}" \
  --dataset_name "$prompts" --reward_model_name_or_path "$work/reward_true" --output_dir "$work/reinforce_bf16" \
  --bf16 true --dtype bfloat16 --inverse_cdf_sampling false
