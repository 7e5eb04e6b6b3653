# The two commands of the README, plus the benchmarks. Each target does its own set-up.
.PHONY: run test bench fmt

# Build the kernel (release) and run it on its embedded defaults: SQLite under ./.nops.
run:
	@scripts/setup.sh
	cargo run --release --locked -p nops -- serve --log-format pretty

# Build everything and run the whole test suite (SQLite always; PostgreSQL when reachable).
test:
	@scripts/test.sh

# Run the benchmarks and print their figures (see docs/benchmarks.md).
bench:
	@scripts/setup.sh
	benches/run.sh

fmt:
	cargo fmt --all
