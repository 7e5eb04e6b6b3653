# The two commands of the README, plus the benchmarks. Each target does its own set-up.
.PHONY: run test bench fmt

# Build the kernel (release) and the reference plugins, and run the kernel on its embedded
# defaults (SQLite under ./.nops) with the reference plugins hot-loaded from ./.nops/plugins.
run:
	@scripts/setup.sh
	@scripts/build-plugins.sh
	@scripts/stage-plugins.sh .nops/plugins
	cargo run --release --locked -p nops -- serve --log-format pretty --plugins-dir .nops/plugins --routing-scorer scorer-weighted

# Build everything and run the whole test suite (SQLite always; PostgreSQL when reachable).
test:
	@scripts/test.sh

# Run the benchmarks and print their figures (see docs/benchmarks.md).
bench:
	@scripts/setup.sh
	benches/run.sh

fmt:
	cargo fmt --all
