# The two commands:  `make serve` runs Parley,  `make test` runs every check.
# Both create .venv and install into it when pyproject.toml is newer than the last install.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# llama-cpp-python compiles from source. A native build (-march=native) crashes in
# decode on some CPUs, so it is built for a portable x86-64 feature set instead; and
# --no-cache-dir keeps pip from handing back a wheel built earlier with other flags.
export CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: serve test lint format clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[local,test]'
	touch $@

serve: $(INSTALLED)
	$(BIN)/parley serve $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

format: $(INSTALLED)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) parley-data .pytest_cache .ruff_cache
