# The two commands: `make up` runs the fleet, `make test` runs the tests.
# Both install what is missing first (nats-server >= 2.10).

CARGO ?= cargo

.PHONY: up test deps browser-deps build bench check-schemas check-deploy check-size

up: deps
	$(CARGO) run --release --bin retro-fleet -- up

# The tests run on the release build, the code that ships; the size check
# then measures the binary that build made, so CI pays for one build.
test: deps browser-deps check-deploy
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --release --profile ci; \
	else \
		$(CARGO) test --workspace --release -- --test-threads=1; \
	fi
	scripts/check-size.sh --built

deps:
	@scripts/install-deps.sh

# The console test's headless Chromium and selenium.
browser-deps:
	@scripts/install-deps.sh --browser

# deploy/ and docker-compose.yml validated offline (promtool, kubernetes-validate).
check-deploy: deps
	@scripts/install-deps.sh --deploy
	scripts/check-deploy.sh

build:
	$(CARGO) build --release --workspace

# The release binary stays under its size limit (docs/OPERATIONS.md).
check-size:
	scripts/check-size.sh

# Fleet vs bare JetStream floor, window 64 and 1 (see docs/BENCHMARKS.md).
bench: deps
	scripts/bench.sh
