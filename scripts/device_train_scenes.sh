#!/usr/bin/env bash
# Train the scene model on a lent GPU machine in one call of the device tool, measure it, and bring it back.
#
#   scripts/device_train_scenes.sh [train-scenes options...]
#   e.g. --size 256 --vae-batch 16 --unet-batch 128 --vae-seconds 120 --decoder-seconds 30 --unet-seconds 240
#        --checkpoint-every 1000
#
# The call has 10 minutes (the device's limit): --vae-seconds, --decoder-seconds and --unet-seconds give each stage
# a share of them, its step timed on the device before training (train.log gives the --vae-steps, --decoder-steps
# and --unet-steps that plan the same run); rendering and encoding the scenes comes on top (on 16 cores, estimated at a minute or two, not measured).
# The benchmarks get what is left of SCENE_CALL_SECONDS (default 570) once the model is packed: first `bench
# scene-model` (samples, VAE, round trip, feature tracking, latent transplant), keeping SCENE_DRAG_SECONDS (default
# 120) for `bench scenes` on SCENE_DRAG_CASES (default 4) cases with three variants, which says whether a drag moves
# anything. A benchmark cut short still leaves the model and the logs in $OUT, and `bench scene-model --model DIR`
# and `bench scenes --model DIR` can measure the model elsewhere.
#
# Run from the repository root, where the device tool runs commands. Everything comes back through $OUT, within
# its limits (8 files, 16 MiB each): train.log, bench.log, scene-model.json (`bench scene-model`'s report),
# samples.png (samples from noise), transplant.png (the latent transplant's pictures), scenes.log (the drags, their
# table last) and the model as model.tar.gz.part-aa, -ab (join them with cat, then untar; the shipped widths make
# two parts, so a wider model would leave a file behind). The training folder stays in /tmp/scene-training, so a
# second call on the same warm machine with the same options resumes instead of starting again.
#
# The device image has no diffusers: carry its wheel (pure Python) in .whl, which .gitignore keeps out of git:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# and name .whl in the call's carry. That is the version the tests ran with; its own dependencies were all in the
# image when last listed. Nothing is downloaded: every model is built or loaded from local files.
#
# Environment: PYTHON (default python3), SCENE_DEVICE (default cuda), SCENE_TRAINING_DIR (default
# /tmp/scene-training), SCENE_CALL_SECONDS (default 570), SCENE_DRAG_SECONDS (default 120), SCENE_DRAG_CASES
# (default 4), OUT (set by the device tool).
set -euo pipefail

out="${OUT:?OUT is not set: run this through the device tool, or set OUT to a folder}"
python="${PYTHON:-python3}"
device="${SCENE_DEVICE:-cuda}"
work="${SCENE_TRAINING_DIR:-/tmp/scene-training}"
deadline=$((SECONDS + ${SCENE_CALL_SECONDS:-570}))
drag_seconds="${SCENE_DRAG_SECONDS:-120}"
drag_cases="${SCENE_DRAG_CASES:-4}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import diffusers" 2>/dev/null || { echo "diffusers is missing: carry its wheel in .whl (see above)" >&2; exit 2; }

logged() {  # logged LOG COMMAND...: run COMMAND, its whole output in LOG, all but progress redraws on stdout
    local log=$1
    shift
    # Progress bars redraw with carriage returns: one line per redraw in the log, none in the device's output tail.
    "$@" 2>&1 | tr '\r' '\n' | tee "$log" | { grep -v -e '%|' -e '^$' || true; }
}

cut_at() {  # cut_at SECONDS LOG COMMAND...: `logged`, stopped after SECONDS; a cut run still counts as done
    local seconds=$1 log=$2 status=0
    shift 2
    logged "$log" timeout --signal=INT "$seconds" "$@" || status=$?
    if ((status == 124)); then
        # timeout's 124 would read as the whole call timing out; the model and the logs are all in $OUT.
        echo "cut at the call's deadline (figures so far in $(basename "$log"))" | tee -a "$log"
        status=0
    fi
    return "$status"
}

logged "$out/train.log" "$python" -m adaptivedrag_core train-scenes --out "$work" --device "$device" "$@"
tar -C "$work" -czf - model | split -b 15M - "$out/model.tar.gz.part-"
left=$((deadline - SECONDS))
if ((left < 30)); then
    echo "no time left for the benchmarks (${left} s): measure the returned model with bench scene-model" | tee "$out/bench.log"
    exit 0
fi
# The model's own figures first (its samples come first of all), keeping drag_seconds for a few drags after them.
model_seconds=$((left > drag_seconds + 60 ? left - drag_seconds : left))
cut_at "$model_seconds" "$out/bench.log" "$python" -m adaptivedrag_core bench scene-model --model "$work/model" \
    --device "$device" --grid "$out/samples.png" --transplant-grid "$out/transplant.png" --out "$out/scene-model.json"
left=$((deadline - SECONDS))
if ((left < 30)); then
    echo "no time left for the drags (${left} s): run bench scenes --model on the returned model" | tee "$out/scenes.log"
    exit 0
fi
# Does a drag move anything on this model? MD from the picture beside each method's tracked handle (docs/quality.md).
cut_at "$left" "$out/scenes.log" "$python" -m adaptivedrag_core bench scenes --model "$work/model" --device "$device" \
    --cases "$drag_cases" --variant "dragdiffusion + user mask" --variant "freedrag + user mask" \
    --variant "adaptive + auto mask" --out "$work/bench-scenes"
