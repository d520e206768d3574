# Everything installs on first use into .venv/ at the repository root.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTO_FILES := protos/mediavault/storage/v1/storage.proto protos/mediavault/media/v1/media.proto
GENERATED := src/mediavault/storage/v1 src/mediavault/media/v1

.PHONY: venv run test test-sanitized proto proto-check gateway gateway-gen gateway-check check bench clean

$(INSTALLED): pyproject.toml setup.py src/mediavault/imaging/_pixels.c src/mediavault/imaging/_jpegtran.c requirements.lock scripts/install-system-deps.sh scripts/install-imaging.sh
	scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	scripts/install-imaging.sh $(VENV)
	$(PY) -m pip install --quiet --constraint requirements.lock --editable '.[dev]'
	touch $@

venv: $(INSTALLED)

## The whole stack (API, blob listener, worker) on embedded PostgreSQL/Valkey unless MEDIAVAULT_DATABASE_URL/REDIS_URL are set.
run: $(INSTALLED)
	$(VENV)/bin/mediavault dev

## The test suite against real servers (MEDIAVAULT_TEST_DATABASE_URL/REDIS_URL, else embedded ones).
test: $(INSTALLED)
	$(PY) -m pytest -q

## The imaging tests against the C extensions built with AddressSanitizer and UBSan (scripts/test-sanitized.sh).
test-sanitized: $(INSTALLED)
	scripts/test-sanitized.sh $(PY)

## Regenerates the Python code of the protos.
proto: $(INSTALLED)
	$(PY) -m grpc_tools.protoc -I protos -I third_party/googleapis \
		--python_out=src --pyi_out=src --grpc_python_out=src $(PROTO_FILES)

## Fails when the committed generated code differs from what `make proto` produces.
proto-check: proto
	@git diff --exit-code -- $(GENERATED) || (echo "generated code is stale: run make proto and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- $(GENERATED))" || \
		(echo "generated files not committed: run make proto and commit" >&2; git status --short -- $(GENERATED); exit 1)

## The REST/JSON gateway for the BFF (grpc-gateway v1 from Debian's packages, GOPATH mode): gateway/bin/mediavault-gateway.
gateway:
	scripts/install-gateway-deps.sh
	gateway/build.sh

## Regenerates the gateway's Go code (gateway/gen) and the OpenAPI documents (docs/openapi) from protos/.
gateway-gen:
	scripts/install-gateway-deps.sh
	gateway/generate.sh

## Fails when the committed gateway code or OpenAPI documents differ from what `make gateway-gen` produces.
gateway-check: gateway-gen
	@git diff --exit-code -- gateway/gen docs/openapi || (echo "gateway code or OpenAPI is stale: run make gateway-gen and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- gateway/gen docs/openapi)" || \
		(echo "generated files not committed: run make gateway-gen and commit" >&2; git status --short -- gateway/gen docs/openapi; exit 1)

## The static gates: buf lint (STANDARD rules) on the protos; ruff and mypy (configured in
## pyproject.toml) on the Python; promtool on the Prometheus rules and configuration (the rules'
## unit tests run in tests/test_deploy.py). The configuration's rule_files path exists only in
## the container, so that check is of its syntax.
check: $(INSTALLED)
	npx --yes @bufbuild/buf lint
	$(VENV)/bin/ruff check src workers tests bench
	$(VENV)/bin/mypy
	promtool check rules deploy/prometheus/alerts.yml
	promtool check config --syntax-only deploy/prometheus/prometheus.yml

## Every benchmark in bench/, against a stack it starts itself, or TARGET=host:port.
bench: $(INSTALLED)
	$(PY) bench/run.py $(if $(TARGET),--target $(TARGET))

clean:
	rm -rf $(VENV) .mediavault .pytest_cache .mypy_cache .bench gateway/bin
