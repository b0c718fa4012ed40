#!/usr/bin/env bash
# Run the shipped accelerate configs for real on the GPUs of this machine (1 or more):
# sft and rl (RLOO+cpm, and PPO+kl under FSDP) for a few steps on a tiny model, each against
# a plain single-process run. Prints one line per run and the largest weight difference.
#   bash tests/scripts/gpu_accelerate_configs.sh [wheel folder with deepspeed, peft]
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
WORK=${WORK:-$(mktemp -d)}
GPUS=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
python -c "import sys, torch, accelerate, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'x', torch.cuda.device_count())"
if [ -n "${1:-}" ]; then
  python -m pip install -q --no-index --find-links "$1" deepspeed peft 2>&1 | tail -2
fi
python -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "deepspeed: not installed"

python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
from pmrlhf.models import build_tiny_model
work = Path(sys.argv[1])
texts = ["Which season do you like best ?", "Which drink do you prefer ?",
         "I like summer best . I like winter best . I like spring best .",
         "I prefer tea . I prefer coffee . I prefer water ."]
build_tiny_model(work / "tiny", texts, seed=0)
rows = [{"prompt": p, "completion": c} for p in texts[:2]
        for c in ("I prefer tea .", "I prefer coffee .", "I prefer water .", "I like summer .")]
(work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
(work / "prompts.jsonl").write_text(json.dumps({"prompt": "Which drink do you prefer ?"}) + "\n")
(work / "reward.py").write_text(
    "def likes_tea(prompts, completions):\n"
    "    return [c.split().count('tea') - 0.1 * len(c.split()) for c in completions]\n")
PY

W=$WORK
SFT="--model $W/tiny --data $W/sft.jsonl --max-steps 3 --lr 1e-3 --eval-fraction 0 --eval-before false --seed 7 --quiet true --dtype bf16"
RL="--policy $W/tiny --reward $W/reward.py:likes_tea --prompts $W/prompts.jsonl --beta 0.1 --alpha 0.1 --steps 2 --prompts-per-step 1 --samples-per-prompt 2 --max-new-tokens 4 --min-new-tokens 4 --lr 1e-3 --critic-lr 1e-3 --seed 3 --quiet true --dtype bf16"

run() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  timeout ${RUN_TIMEOUT:-120} "$@" > "$W/$name.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))"
  if [ $rc -ne 0 ]; then grep -E "Error|error:" "$W/$name.log" | grep -v "^\s*$" | tail -3 | cut -c1-400; fi
}
diff_weights() {  # two model folders
  python - "$1" "$2" <<'PY'
import sys
from safetensors.torch import load_file
try:
    a, b = load_file(sys.argv[1] + "/model.safetensors"), load_file(sys.argv[2] + "/model.safetensors")
except Exception as e:
    print(f"    compare: {type(e).__name__}: {e}"[:300]); raise SystemExit
names = a.keys() & b.keys()
print(f"    max |diff| vs 1 process: {max(float((a[k].float() - b[k].float()).abs().max()) for k in names):.3g}"
      f" over {len(names)} tensors; dtypes {sorted({str(v.dtype) for v in a.values()})}")
PY
}

run sft_single python -m pmrlhf sft $SFT --batch-size 4 --output-dir $W/sft_single
run rl_rloo_single python -m pmrlhf rl $RL --algo rloo --regularizer cpm --output-dir $W/rl_rloo_single
for cfg in ${CONFIGS:-ddp fsdp deepspeed_zero2 deepspeed_zero3}; do
  case $cfg in deepspeed*) python -c "import deepspeed" 2>/dev/null || { echo "$cfg: skipped (no deepspeed)"; continue; };; esac
  L="accelerate launch --config_file configs/accelerate/$cfg.yaml --num_processes $GPUS"
  [ "$GPUS" = 1 ] && [ $cfg = ddp ] && { echo "ddp: skipped (1 GPU)"; continue; }
  run sft_$cfg $L -m pmrlhf sft $SFT --batch-size $((4 / GPUS > 0 ? 4 / GPUS : 1)) --output-dir $W/sft_$cfg
  diff_weights $W/sft_$cfg/model $W/sft_single/model
  run rl_rloo_$cfg $L -m pmrlhf rl $RL --algo rloo --regularizer cpm --output-dir $W/rl_rloo_$cfg
  diff_weights $W/rl_rloo_$cfg/policy $W/rl_rloo_single/policy
  run rl_rloo_${cfg}_resume $L -m pmrlhf rl $RL --algo rloo --regularizer cpm --steps 3 --output-dir $W/rl_rloo_$cfg --resume $W/rl_rloo_$cfg/checkpoint
  if [ $cfg = fsdp ]; then
    run rl_ppo_$cfg $L -m pmrlhf rl $RL --algo ppo --regularizer kl --output-dir $W/rl_ppo_$cfg
  fi
done
for d in "$W"/rl_rloo_*/checkpoint; do echo "$d: $(ls "$d" | tr "\n" " ")"; done
