# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-lmms train-smoke testbed testbed-smoke testbed-projectors clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ivtp demo --out ivtp_out

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The lmms-eval plugin in a venv of its own (.[lmms] pins lmms-eval, whose dependencies stay out of .venv).
LMMS_VENV := .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.installed

$(LMMS_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install --upgrade pip
	$(LMMS_PY) -m pip install -e ".[lmms,dev]"
	touch $(LMMS_STAMP)

test-lmms: $(LMMS_STAMP)
	$(LMMS_PY) -m pytest -q tests/integrations

# A few DeepSpeed ZeRO-2 steps on CPU: tiny-random model, fixture data, IVTP pruning active in the forward; then
# the checkpoint loads back, with the aligner it carries, and answers (offline: nothing may be downloaded). On a
# free port: another run on the machine may hold DeepSpeed's default, 29500.
train-smoke: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 1 --master_port $$($(PY) -c "from ivtp.testbed.pipeline import free_port; print(free_port())") \
		train/finetune.py --deepspeed configs/deepspeed/zero2.json \
		--prune-config configs/ivtp_64.yaml --model_name_or_path tiny-random \
		--data_path data/fixtures/tiny_llava.json --image_folder data/fixtures/images \
		--output_dir ivtp_out/train-smoke --max_steps 3 --per_device_train_batch_size 2 \
		--learning_rate 1e-3 --use_cpu True --report_to none --save_strategy no --logging_steps 1 \
		--gradient_checkpointing True
	test -f ivtp_out/train-smoke/ivtp_config.json && test -f ivtp_out/train-smoke/model.safetensors
	HF_HUB_OFFLINE=1 $(VENV)/bin/ivtp generate --model ivtp_out/train-smoke --image data/fixtures/images/scene0.png \
		--prompt "What is in the image?" --max-new-tokens 4

# The CPU-trainable miniature (docs/testbed.md): data, tiny CLIP, tiny LLaVA trained unpruned and IVTP-retrained
# through train/*.py with DeepSpeed, IVTP-retrained in the paper's form and in our best extension (BEST_EXTENSION in
# ivtp/testbed/configs.py), every method and ablation evaluated, and the extension's model shipped as the demo's
# default: it beat the paper's form retrained the same way (docs/testbed.md, "Does the instruction guide?").
# The two ablate sweeps run side by side on one thread each; the third call only gathers their cached runs.
TESTBED_ABLATE := $(VENV)/bin/ivtp ablate --testbed ivtp_out/testbed --limit 700 --pope-images 50
testbed: $(STAMP)
	$(PY) -m ivtp.testbed.pipeline --out ivtp_out/testbed
	$(PY) -m ivtp.testbed.pipeline --out ivtp_out/testbed --stages retrain --retrain-as best
	$(TESTBED_ABLATE) --suites methods --threads 1 > ivtp_out/testbed/ablate_methods.log 2>&1 & pid=$$!; \
	$(TESTBED_ABLATE) --suites group,tau,aggregation,guidance,stages,extensions,tau_extended --threads 1 \
		> ivtp_out/testbed/ablate_rest.log 2>&1; \
	wait $$pid
	$(TESTBED_ABLATE)
	$(PY) -m ivtp.testbed.pipeline --out ivtp_out/testbed --ship ivtp/assets/testbed --retrain-as best
	mkdir -p docs/testbed && cp ivtp_out/testbed/ablate/ablate.md ivtp_out/testbed/ablate/*.png docs/testbed/

# After `make testbed`: the trained compressors (issue 21; Honeybee, LLaMA-VID, Qwen-VL in place of LLaVA's
# projector) trained with the testbed's recipe (about 1.5 hours, estimated), then the ablation again: its finished
# runs come from the cache, and the methods table and plot gain the three rows.
testbed-projectors: $(STAMP)
	$(PY) -m ivtp.testbed.projectors --out ivtp_out/testbed
	$(TESTBED_ABLATE)
	$(PY) -m ivtp.testbed.pipeline --out ivtp_out/testbed --ship ivtp/assets/testbed --retrain-as best
	mkdir -p docs/testbed && cp ivtp_out/testbed/ablate/ablate.md ivtp_out/testbed/ablate/*.png docs/testbed/

# Every testbed stage on a few samples (CI): checks that the pipeline runs end to end, not what it learns. The
# trained compressors too (six DeepSpeed launches of a few steps: about 2 minutes).
testbed-smoke: $(STAMP)
	$(PY) -m ivtp.testbed.pipeline --out ivtp_out/testbed-smoke --smoke
	$(PY) -m ivtp.testbed.pipeline --out ivtp_out/testbed-smoke --smoke --stages retrain --retrain-as best
	$(PY) -m ivtp.testbed.projectors --out ivtp_out/testbed-smoke
	$(VENV)/bin/ivtp ablate --testbed ivtp_out/testbed-smoke --suites methods,stages --budgets 7 --limit 8 \
		--out ivtp_out/testbed-smoke/ablate
	test -f ivtp_out/testbed-smoke/ablate/ablate.md && test -f ivtp_out/testbed-smoke/ablate/ablate_methods.png
	grep -q "| llava-llama_vid | llama_vid | 5 |" ivtp_out/testbed-smoke/ablate/ablate.md

clean:
	rm -rf $(VENV) $(LMMS_VENV) ivtp_out .pytest_cache
