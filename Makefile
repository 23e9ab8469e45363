# One-command set-up and runs on a fresh machine: `make test`, `make demo`.
# Override the torch build, e.g. `make test TORCH_SPEC="torch torchvision"` or a CPU/CUDA index of your choice.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint format bench clean

install: $(STAMP)

# torch/torchvision first (a bare `torch` requirement would otherwise pull another multi-GB build), then the package
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The demo (README "The demo"): MEME's 4 small iU-Net experts (8/16/32 channels, 0.28x the single model's MACs each,
# hard expert strategy, 1000 steps each) and one UNet2DModel (16/32/64) trained with the same training MACs (1120
# steps), on the bundled MNIST digits at 16x16 (4,500 for training, 500 held out), then both scored on the held-out
# digits: class accuracy, FID, held-out loss per t bin, at guidance 1.0 / 1.5 / 2.0 (examples/demo_report.py).
# Two data-parallel processes with one thread each (global batch 32) use both cores more robustly than two threads.
DEMO_TRAIN = ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc_per_node 2 \
	examples/train_meme.py --overwrite_output_dir --resolution 16 --num_classes 10 --class_dropout_prob 0.1 \
	--train_batch_size 16 --max_train_samples 4500 --learning_rate 2e-3 --lr_warmup_steps 100 --use_ema \
	--ema_power 0.6667 --checkpointing_steps 100000 --checkpoints_total_limit 1 --report_to none \
	--num_preview_images 40 --guidance_scale 1.5 --preview_inference_steps 25

demo: $(STAMP)
	$(DEMO_TRAIN) --output_dir outputs/demo --model_config examples/configs/meme_mnist_small.json \
		--num_experts 4 --expert_type iunet --strategy hard --expert_order interleaved --max_train_steps 1000
	$(DEMO_TRAIN) --output_dir outputs/demo-single --model_config examples/configs/meme_mnist_demo.json \
		--num_experts 1 --expert_type unet --max_train_steps 1120
	OMP_NUM_THREADS=1 $(BIN)/python examples/demo_report.py --model mixture=outputs/demo \
		--model single=outputs/demo-single --train_digits 4500 --out outputs/demo/report

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests examples benchmarks
	$(BIN)/ruff format src tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/routing_overhead.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/quality.py --quick --output-dir outputs/quality-quick

clean:
	rm -rf $(VENV) outputs build *.egg-info src/*.egg-info

# diffusers' own tests, run with their denoiser (UNet2DModel, UNet2DConditionModel, DiT/SD3/Wan transformers) swapped
# for an ExpertMixtureUNet (1 expert, then 3 identical hard-routed experts) next to a plain baseline:
# conformance/README.md. CONFORMANCE_SUITE: default (unet + conditional, ~4 min on 2 cores), unet (DDPM/DDIM pipelines,
# UNet2DModel model tests), conditional (DiT pipeline, UNet2DCondition/DiT/SD3/Wan model tests), text (SD/SDXL/SD3/Wan
# pipeline fast tests: they need tiny tokenizers from the Hub), all. Needs diffusers' `tests/` extracted into
# $(DIFFUSERS_TESTS) (or DIFFUSERS_GIT=<bare diffusers git dir> to extract DIFFUSERS_REV from it). Not part of
# `make test`: CI has no diffusers checkout.
DIFFUSERS_TESTS ?= /tmp/diffusers-tests
DIFFUSERS_GIT ?=
DIFFUSERS_REV ?= HEAD
CONFORMANCE_MODES ?= 0 1 3
CONFORMANCE_ROUTING ?= hard
CONFORMANCE_SUITE ?= default
CONFORMANCE_TESTS ?=
CONFORMANCE_DEPS ?= outputs/conformance/deps

.PHONY: conformance
conformance: $(STAMP)
	@if [ ! -d "$(DIFFUSERS_TESTS)/tests" ] && [ -n "$(DIFFUSERS_GIT)" ]; then \
		mkdir -p "$(DIFFUSERS_TESTS)" && git --git-dir="$(DIFFUSERS_GIT)" archive "$(DIFFUSERS_REV)" tests | tar -x -C "$(DIFFUSERS_TESTS)"; fi
	@test -d "$(DIFFUSERS_TESTS)/tests" || { echo "No diffusers tests in DIFFUSERS_TESTS=$(DIFFUSERS_TESTS): extract them (see conformance/README.md) or set DIFFUSERS_GIT."; exit 2; }
	test -d $(CONFORMANCE_DEPS)/parameterized || $(BIN)/python -m pip install --no-deps --target $(CONFORMANCE_DEPS) parameterized requests-mock
	OMP_NUM_THREADS=1 $(BIN)/python conformance/run.py --tests-root "$(DIFFUSERS_TESTS)" --modes $(CONFORMANCE_MODES) \
		--routing $(CONFORMANCE_ROUTING) --suite $(CONFORMANCE_SUITE) --deps $(CONFORMANCE_DEPS) --out outputs/conformance \
		$(CONFORMANCE_TESTS)
