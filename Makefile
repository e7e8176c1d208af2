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

.PHONY: serve test lint web web-check format clean

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

test: lint web-check
	$(BIN)/pytest $(PYTEST_ARGS)

# The page's libraries (package.json) are copied into src/parley/web/vendor and committed,
# so installing Parley never needs Node. `make web` rebuilds them; `make web-check` fails
# when the committed copies differ from a fresh build.
web:
	npm ci --no-audit --no-fund
	npm run build

web-check: web
	@git diff --quiet -- src/parley/web/vendor \
		&& test -z "$$(git ls-files --others --exclude-standard -- src/parley/web/vendor)" \
		|| { echo "src/parley/web/vendor is stale: run 'make web' and commit it"; exit 1; }

format: $(INSTALLED)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) parley-data .pytest_cache .ruff_cache node_modules test-artifacts
