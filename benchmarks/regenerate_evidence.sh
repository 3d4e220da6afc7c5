#!/bin/bash
# Regenerates, from a clean checkout, every published record that the converged attackers, the frontiers, the
# funnel-as-the-paper-builds-it and the like-for-like Salted training change (Evidence II). Each command refuses a
# dirty tree, so the records say which commit made them. Run from the project root after `make setup`:
#
#   bash benchmarks/regenerate_evidence.sh [STEP ...]      # no STEP: all of them, in this order
#
# Times are for this project's 2-core CPU machine, one job at a time; victims and diffusion weights come from the
# training cache when present. The long steps pass --resume: a run that was stopped goes on from the units it finished
# (sweep cuts, extraction runs) when rerun from the same commit. Steps:
#   defaults    SiftFunnel's strength per data set and model within 3 points (--write-defaults)   ~60 min
#   frontier    defence frontiers, VGG and ResNet on fashion-mnist, every attack (--quick)       ~20 h per model
#   depth       attack strength against cut depth, VGG (--quick)                                 ~4 h
#   depth-others  the same for LeNet and ResNet (--quick, cuts 1-4), replacing 2-epoch records     ~1 h + ~6 h
#   depth-full  VGG cuts 1-5 and LeNet, ResNet cuts 1, 3 at default size (30,000 images), inverse
#               network and c-GAN: the default-size tables, replacing 2-epoch records   not yet timed; many hours
#               (a cut is 1.2-1.6 CPU-hours: each learned attacker trains 28-130 epochs to its plateau, and the
#               three MI estimators take 20-35 min; frontier: up to 33 (defence, strength) units per model)
#   tee         TEE cut selection, converged attacks and rMLE: VGG, ResNet, MobileNet  2-3 CPU-hours each
#   salted      Salted DNNs, standard and salted trained alike (--quick)                         ~1 h
#   salted-full Salted DNNs at full size (VGG, fashion-mnist), trained alike, converged readers    ~1 h
#   salted-motions  Salted DNNs on BasicMotions: seeds 0-2, fc and perm salts, adversarial training  ~30 min
#   text        text privacy against head depth and per-position defences, readouts converged    ~2 h
#   diffusion   diffusion leakage without hindsight (bench diffusion)                             ~20 min
#   weights-cnn SLIP extraction curves on LeNet and VGG (stolen images), plain and hardened split  ~1 h
#   weights     SLIP extraction curves on SmolLM2, plain and hardened split                       many hours
#   service     the load and batched-decode records                                               ~10 min
set -euo pipefail
SV="${SV:-.venv/bin/splitveil}"
# Records go to an ignored folder, not straight over the tracked ones: a rewritten tracked record would make the tree
# dirty, and every later step (and a --resume of this one) would then refuse to run. Copy them into
# benchmarks/results/ and commit when the steps are done.
OUT="${OUT:-build/evidence}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

step_defaults() {
  $SV attack image-defaults --defence siftfunnel --cut 2 --write-defaults --out "$OUT"
}
step_frontier() {
  for model in vgg resnet; do
    $SV attack image-sweep --dataset fashion-mnist --model "$model" --splits 2 --attacks inverse,rmle,shadow,cgan \
      --defences none,siftfunnel:0.5,siftfunnel,noise,dropout,nopeek,cem,vib --frontier --quick --jobs 2 --resume --out "$OUT"
  done
}
step_depth() {
  $SV attack image-sweep --dataset fashion-mnist --model vgg --splits 1,2,3,4,5 --attacks inverse,rmle,shadow,cgan \
    --quick --jobs 2 --resume --out "$OUT"
}
step_depth-others() {
  for model in lenet resnet; do
    $SV attack image-sweep --dataset fashion-mnist --model "$model" --splits 1,2,3,4 --attacks inverse,rmle,shadow,cgan \
      --quick --jobs 2 --resume --out "$OUT"
  done
}
step_depth-full() {
  $SV attack image-sweep --dataset fashion-mnist --model vgg --splits 1,2,3,4,5 --attacks inverse,cgan --jobs 2 --resume \
    --out "$OUT"
  for model in lenet resnet; do
    $SV attack image-sweep --dataset fashion-mnist --model "$model" --splits 1,3 --attacks inverse --jobs 2 --resume --out "$OUT"
  done
}
step_tee() {
  for model in vgg resnet mobilenet; do
    $SV partition --dataset fashion-mnist --model "$model" --quick --resume --out "$OUT"
  done
}
step_salted() {
  $SV attack output-sweep --dataset fashion-mnist --model vgg --salt-layers 0,1,2,3,4 --defence salt --quick --out "$OUT"
}
step_salted-full() {
  $SV attack output-sweep --dataset fashion-mnist --model vgg --salt-layers 0,1,2,3,4 --defence salt --out "$OUT"
}
step_salted-motions() {
  for seed in 0 1 2; do
    $SV attack output-sweep --dataset basic-motions --defence salt --seed "$seed" --out "$OUT"
  done
  $SV attack output-sweep --dataset basic-motions --defence salt:fc --out "$OUT"
  $SV attack output-sweep --dataset basic-motions --defence salt:perm --out "$OUT"
  $SV attack output-sweep --dataset basic-motions --defence salt --adversary-weight 1 --out "$OUT"
}
step_text() {
  $SV attack text-sweep --attacks nearest --depths 0,1,2,4,8,15 --out "$OUT"
  $SV attack text-sweep --attacks exact --depths 1,2,4,8 --out "$OUT" --append
  $SV attack text-sweep --attacks exact --ranker learned --depths 15 --out "$OUT" --append
  $SV attack text-sweep --attacks exact --wire fp16 --depths 1,2,4,8 --out "$OUT" --append
  $SV attack text-sweep --attacks exact --wire fp16 --ranker learned --depths 15 --out "$OUT" --append
  $SV attack text-sweep --attacks learned --depths 1,2,4,8,15 --out "$OUT" --append
  $SV attack text-sweep --attacks exact,learned --depths "" --defences permute:1,randcut:2,noise:0.1,noise:0.5,noise:1 \
    --out "$OUT" --append
}
step_diffusion() {
  $SV bench diffusion --out "$OUT"
}
step_weights-cnn() {
  for model in lenet vgg; do
    $SV attack weights-curves --model "$model" --resume --out "$OUT"
    $SV attack weights-curves --model "$model" --hardened --resume --out "$OUT"
  done
}
step_weights() {
  $SV attack weights-curves --model smollm2-135m --attacks nullspace,lowrank,full,scratch \
    --budgets 12800,51200,102400 --resume --out "$OUT"
  $SV attack weights-curves --model smollm2-135m --attacks nullspace,lowrank,full,scratch \
    --budgets 12800,51200,102400 --hardened --resume --out "$OUT"
}
step_service() {
  $SV bench load --out "$OUT"
  $SV bench batched --out "$OUT"
}

# Finished units (sweep cuts, extraction runs) are kept in the cache and read back by --resume. A sitting on another
# machine starts with an empty cache, so units travel in benchmarks/units/ (small JSON, named by a hash of the unit's
# settings, its commit and torch version): copied into the cache before the steps, and the cache's copied back after
# them, stopped or not. Commit benchmarks/units/ to carry a run that did not finish to the next sitting.
UNITS="$(.venv/bin/python -c 'from splitveil.models.loading import cache_root; print(cache_root() / "sweep-units")')"
mkdir -p "$UNITS" benchmarks/units
cp -n benchmarks/units/*.json "$UNITS"/ 2>/dev/null || true
trap 'cp -n "$UNITS"/*.json benchmarks/units/ 2>/dev/null || true' EXIT

steps=("$@")
ALL_STEPS=(defaults frontier depth depth-others depth-full tee salted salted-full salted-motions text diffusion weights-cnn weights service)
[ ${#steps[@]} -eq 0 ] && steps=("${ALL_STEPS[@]}")
for step in "${steps[@]}"; do
  declare -F "step_$step" >/dev/null || { echo "unknown step '$step'; known: ${ALL_STEPS[*]}" >&2; exit 2; }
  echo "== $step ($(date -u +%H:%M:%S))"
  "step_$step"
done
echo "records in $OUT: copy them into benchmarks/results/ and commit"
