#!/usr/bin/env bash
# Every GPU figure bench/RESULTS.md asks for, in groups that each fit one device call (10 minutes a command):
#   bash bench/gpu_run.sh core     clip_retrieval, blip2_lora_caption, soft_prompt_caption
#                                  (recipe, baseline, TRL)
#   bash bench/gpu_run.sh llava    llava_instruct at LLaVA-1.5-7B dims: mb 8, then mb 16 with activation
#                                  checkpointing
#   bash bench/gpu_run.sh qlora    qlora_vqa at LLaVA-1.5-7B dims, LM in NF4
#   bash bench/gpu_run.sh levers   the levers of RESULTS.md's table for the BLIP-2, soft-prompt and CLIP
#                                  recipes, device mode
#   bash bench/gpu_run.sh llava-levers   the same for llava_instruct at LLaVA-1.5-7B dims
#   bash bench/gpu_run.sh qwen     llava_instruct at Qwen2.5-VL-7B-Instruct dims (--model qwen2_5_vl)
#   bash bench/gpu_run.sh qwen-qlora   qlora_vqa at Qwen2.5-VL-7B-Instruct dims, LM in NF4
# on the device machine with `carry: [".whl"]` (bench/gpu_wheels.sh makes .whl/ here). Each run writes
# $OUT/<name>.json (the harness's JSON: device, versions, command, rows) and $OUT/<name>.log, and a line to
# $OUT/summary.txt; a run that fails or outlasts its share is a line too, and the next one starts. A run whose
# JSON is already in $OUT is skipped (a line says so), so a group run again does only what is missing; logs
# are appended to. Run the groups by priority, one device call each. BENCH adds harness flags to every run:
# BENCH="--size tiny --device cpu --steps 1 --warmup 1" runs the whole script on the tiny models here (a smoke
# run of the script, no figures).
set -u
group=${1:?usage: bash bench/gpu_run.sh core|llava|qlora|levers|llava-levers|qwen|qwen-qlora}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
read -r -a extra <<< "${BENCH:-}"

# run NAME SECONDS RECIPE [harness flags] [-- recipe flags]
run() {
  local name=$1 limit=$2 recipe=$3
  shift 3
  if [[ -e "$OUT/$name.json" ]]; then  # the harness never replaces a result: a group run again resumes
    echo "$name: kept $OUT/$name.json from an earlier run (remove it to run it again)" \
      | tee -a "$OUT/summary.txt"
    return
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$PY" -m bench "$recipe" "${extra[@]}" --json "$OUT/$name.json" "$@" \
    >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s: $PY -m bench $recipe ${extra[*]} $*" \
    | tee -a "$OUT/summary.txt"
}

case $group in
  core)
    run clip 170 clip_retrieval --pad-text-to 77
    run blip2 200 blip2_lora_caption
    run softprompt 170 soft_prompt_caption
    ;;
  llava)
    run llava 280 llava_instruct
    run llava-ckpt 280 llava_instruct --batch-size 16 -- --activation_checkpointing true
    ;;
  qlora)
    run qlora 540 qlora_vqa
    ;;
  levers)  # recipe only, device mode: each against the default rows of the groups above
    run blip2-cache 100 blip2_lora_caption --mode device --no-baseline -- --cache_vision_features true
    run blip2-labelpos 80 blip2_lora_caption --mode device --no-baseline -- --loss_on_label_positions true
    run softprompt-cache 60 soft_prompt_caption --mode device --no-baseline -- --cache_vision_features true
    run softprompt-labelpos 50 soft_prompt_caption --mode device --no-baseline -- \
      --loss_on_label_positions true
    run clip-fused 50 clip_retrieval --pad-text-to 77 --mode device --no-baseline -- --optim adamw_torch_fused
    run clip-compile 150 clip_retrieval --pad-text-to 77 --mode device --no-baseline -- --torch_compile true
    ;;
  llava-levers)
    run llava-labelpos 110 llava_instruct --mode device --no-baseline -- --loss_on_label_positions true
    run llava-dropout0 110 llava_instruct --mode device --no-baseline -- --lora_dropout 0
    run llava-liger 110 llava_instruct --mode device --no-baseline -- --use_liger_kernel true
    run llava-fused 110 llava_instruct --mode device --no-baseline -- --optim adamw_torch_fused
    run llava-paddingfree 110 llava_instruct --mode device --no-baseline -- --padding_free true
    ;;
  qwen)
    run qwen 540 llava_instruct --model qwen2_5_vl
    ;;
  qwen-qlora)
    run qwen-qlora 540 qlora_vqa --model qwen2_5_vl
    ;;
  *)
    echo "unknown group $group: core, llava, qlora, levers, llava-levers, qwen or qwen-qlora" >&2
    exit 2
    ;;
esac
