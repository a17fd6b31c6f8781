.PHONY: run test check lint typecheck bench bench-quick registry zipapp release lint-docker

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

zipapp:         ## build dist/auxot-{router,worker}-linux-{x86_64,aarch64}.pyz (dependencies inside)
	./scripts/build_zipapp.sh

release: zipapp ## the zipapps and dist/SHA256SUMS
	cd dist && sha256sum auxot-router-linux-*.pyz auxot-worker-linux-*.pyz > SHA256SUMS && cat SHA256SUMS

lint-docker:    ## hadolint on both Dockerfiles (installed by requirements-dev.txt)
	.venv/bin/hadolint Dockerfile Dockerfile.worker
