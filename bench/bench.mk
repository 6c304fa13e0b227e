# make bench: unitbox against raw systemd-run (bench/run_bench.py). Not part of make test.
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-scientific bench-cluster bench-postgresql bench-tools

bench-tools: venv
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || { echo "==> pip install matplotlib py-spy into $(VENV) (the chart and the profiler; not runtime dependencies)"; \
	  $(BIN)/pip install --disable-pip-version-check -q matplotlib py-spy; }

bench: bench-tools bench-postgresql  ## benchmark vs systemd-run, D-Bus ceiling and floor (≈20 min), then the cluster mode; writes bench/results/latest.*, cluster.*
	@echo "==> booting a systemd test host, starting unitbox in it, and measuring floor / systemd-run / D-Bus ceiling / unitbox, interleaved, at concurrency 1, 4, 16"
	@$(BIN)/python bench/run_bench.py $(BENCH_ARGS)
	@echo "==> cluster mode: three nodes on one PostgreSQL (bench/cluster.py)"
	@$(BIN)/python bench/cluster.py

bench-quick: bench-tools  ## the same, one short round (under a minute): bench/results/quick.*
	@echo "==> quick benchmark: one short interleaved round (numbers are indicative only)"
	@$(BIN)/python bench/run_bench.py --quick $(BENCH_ARGS)

bench-scientific: venv  ## numpy + pandas cold vs a preloaded warm pool (bench/scientific.py): bench/results/scientific.*
	@/usr/bin/python3 -c 'import numpy, pandas' 2>/dev/null || { echo "==> apt-get install python3-numpy python3-pandas (the program's imports, in the host's Python that runs use)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-numpy python3-pandas; }
	@echo "==> booting a systemd test host; one daemon with a numpy+pandas warm pool; the same program cold and warm, alternating"
	@$(BIN)/python bench/scientific.py $(BENCH_ARGS)

bench-postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "==> apt-get install postgresql (the benchmark starts a throw-away server in a temp dir)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

bench-cluster: venv bench-postgresql  ## only the cluster mode: three nodes on one PostgreSQL, the database's cost per run (≈1 min): bench/results/cluster.*
	@echo "==> the store alone (SQLite, PostgreSQL); then three test hosts, a node in each, on one PostgreSQL"
	@$(BIN)/python bench/cluster.py $(BENCH_ARGS)
