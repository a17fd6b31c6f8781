.PHONY: run test check lint typecheck bench bench-quick registry zipapp

run:            ## install and start the router (embedded Redis)
	./scripts/run-router.sh

test:           ## install what the tests need, then ruff, mypy and the whole suite
	./scripts/test.sh

check: lint typecheck  ## ruff, mypy and the tests (needs `make test` once for the environment)
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .

typecheck:
	.venv/bin/mypy

bench:          ## every benchmark of issue 12 in one run, one table (about 6 minutes)
	.venv/bin/python bench/run_bench.py

bench-quick:    ## the same scenarios, shorter and smaller (under two minutes)
	.venv/bin/python bench/run_bench.py --quick

registry:       ## regenerate registry.json from data/
	.venv/bin/python scripts/gen_registry.py

zipapp:         ## build dist/auxot-router.pyz and dist/auxot-worker.pyz
	./scripts/build_zipapp.sh
