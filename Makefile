# The commands a newcomer types:
#   make test    install what is missing, run every test against real
#                PostgreSQL clusters, then clippy and rustfmt checks
CARGO ?= cargo

.PHONY: test deps build unit-and-integration lint

test: deps build unit-and-integration lint

# PostgreSQL server binaries (and the toolchain's clippy/rustfmt) on a
# fresh machine; explains what to install when it cannot do it itself.
deps:
	@bash tests/install-deps.sh

build:
	$(CARGO) build --workspace --bins

# nextest runs every test in its own process; plain cargo test otherwise.
unit-and-integration:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check
