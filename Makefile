# The commands a newcomer types:
#   make demo    install what is missing, build, and walk the whole journey
#                (check, run, verify, switch, rollback, accept, cleanup) on
#                two throwaway local clusters under an application's writes;
#                make demo DEMO_ARGS="--keep" leaves them up to look at
#   make test    install what is missing, run every test against real
#                PostgreSQL clusters, then clippy and rustfmt checks
#   make bench   cutover against native logical replication, pg_dump and
#                pgcopydb on two throwaway clusters (docs/benchmarks.md);
#                make bench SCENARIO=copy ROWS=100000 for one, smaller
CARGO ?= cargo

.PHONY: test deps build unit-and-integration lint bench demo fuzz

test: deps build unit-and-integration lint fuzz

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

# The parsers that read bytes from outside, under libFuzzer (fuzz/): each
# target for FUZZ_SECONDS on the committed corpus, whose new finds go to a
# scratch directory. No sanitizer, so that the stable toolchain builds it;
# -rss_limit_mb catches an allocation a length field asked for, -timeout a
# hang. A crash fails the run and leaves its input in fuzz/artifacts/.
FUZZ_SECONDS ?= 10
FUZZ_TARGETS = stream pgoutput conninfo console config

fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) fuzz build --sanitizer none
	@for target in $(FUZZ_TARGETS); do \
		scratch=$$(mktemp -d); \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
		(cd fuzz && $(CARGO) fuzz run --sanitizer none $$target $$scratch corpus/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=512 -timeout=10 -max_len=65536 \
			-print_final_stats=1) > $$scratch.log 2>&1; status=$$?; \
		grep -E '^(stat::number_of_executed_units|Done )' $$scratch.log; \
		if [ $$status -ne 0 ]; then tail -60 $$scratch.log; rm -rf $$scratch $$scratch.log; exit 1; fi; \
		rm -rf $$scratch $$scratch.log; \
	done

DEMO_ARGS ?=

demo: deps
	$(CARGO) build --release -p cutover --bin cutover
	target/release/cutover demo $(DEMO_ARGS)

SCENARIO ?= all
ROWS ?= 1000000
BENCH_ARGS ?=

# Not part of `make test`: prints figures, asserts no timing.
bench: deps
	@command -v pgcopydb >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		(apt-get install -y pgcopydb >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y pgcopydb >/dev/null)) || \
		echo "pgcopydb could not be installed: its figures will be missing"
	$(CARGO) build --release -p cutover -p cutover-tests --bin cutover --bin bench
	target/release/bench --scenario $(SCENARIO) --rows $(ROWS) --json target/bench/results.json $(BENCH_ARGS)
