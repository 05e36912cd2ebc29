# The two commands: `make up` runs the fleet, `make test` runs the tests.
# Both install what is missing first (nats-server >= 2.10).

CARGO ?= cargo

.PHONY: up test deps build bench check-schemas

up: deps
	$(CARGO) run --release --bin retro-fleet -- up

test: deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --profile ci; \
	else \
		$(CARGO) test --workspace; \
	fi

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --release --workspace

# Fleet vs bare JetStream floor, window 64 and 1 (see docs/BENCHMARKS.md).
bench: deps
	scripts/bench.sh
