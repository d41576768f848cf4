# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test train-smoke clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ivtp demo --out ivtp_out

test: $(STAMP)
	$(PY) -m pytest -q

# A few DeepSpeed ZeRO-2 steps on CPU: tiny-random model, fixture data, IVTP pruning active in the forward.
train-smoke: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 1 train/finetune.py --deepspeed configs/deepspeed/zero2.json \
		--prune-config configs/ivtp_64.yaml --model_name_or_path tiny-random \
		--data_path data/fixtures/tiny_llava.json --image_folder data/fixtures/images \
		--output_dir ivtp_out/train-smoke --max_steps 3 --per_device_train_batch_size 2 \
		--learning_rate 1e-3 --use_cpu True --report_to none --save_strategy no --logging_steps 1
	test -f ivtp_out/train-smoke/ivtp_config.json && test -f ivtp_out/train-smoke/model.safetensors

clean:
	rm -rf $(VENV) ivtp_out .pytest_cache
